"""RLHF losses against hand-computed values and the formulas of InstructGPT, TRL and PPO."""
import math

import pytest
import torch

from engine.rlhf.losses import (clipped_sequence_loss, clipped_token_loss, dpo_loss, gae, grpo_advantages, kl_estimate, ppo_advantages,
                                ppo_policy_loss, ppo_value_loss, reward_model_loss, rloo_advantages, token_rewards,
                                whiten)


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_reward_model_loss_weighs_each_prompt_the_same():
    chosen, rejected = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 1.5, 0.0])
    group = torch.tensor([0, 0, 1])   # prompt 0 has two pairs, prompt 1 one
    loss, accuracy, margin = reward_model_loss(chosen, rejected, group)
    prompt0 = (-math.log(sig(1.0)) - math.log(sig(-0.5))) / 2
    prompt1 = -math.log(sig(0.5))
    assert loss.item() == pytest.approx((prompt0 + prompt1) / 2)
    assert accuracy.item() == pytest.approx(2 / 3) and margin.item() == pytest.approx((1.0 - 0.5 + 0.5) / 3)
    flat, _, _ = reward_model_loss(chosen, rejected)
    assert flat.item() == pytest.approx((-math.log(sig(1.0)) - math.log(sig(-0.5)) - math.log(sig(0.5))) / 3)


def test_dpo_loss_by_hand():
    loss, chosen, rejected = dpo_loss(torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]),
                                      torch.tensor([-11.0, -4.5]), torch.tensor([-11.0, -3.5]), beta=0.1)
    # row 1: 0.1 x ((-10 + 11) - (-12 + 11)) = 0.2; row 2: 0.1 x (0.5 - 0.5) = 0
    assert loss.item() == pytest.approx((-math.log(sig(0.2)) - math.log(sig(0.0))) / 2)
    assert chosen.tolist() == pytest.approx([0.1, 0.05]) and rejected.tolist() == pytest.approx([-0.1, 0.05])


def test_token_rewards_put_the_score_on_the_last_response_token():
    mask = torch.tensor([[0, 1, 1, 1, 0.0]])
    r = token_rewards(torch.tensor([2.0]), torch.tensor([[0, -1.0, -2.0, -1.5, 0]]),
                      torch.tensor([[0, -1.5, -2.0, -1.0, 0]]), mask, beta=0.1)
    assert r.tolist()[0] == pytest.approx([0, -0.05, 0, 0.05 + 2.0, 0])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.8]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    d2 = 1.0 - 0.8                      # last step: no next value
    d1 = 0.0 + 0.8 - 0.4
    d0 = 0.0 + 0.4 - 0.5
    a2, a1 = d2, d1 + 0.95 * d2
    a0 = d0 + 0.95 * a1
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.8])


def test_gae_ignores_padding_after_the_response():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])
    values = torch.tensor([[0.2, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, _ = gae(rewards, values, mask)
    assert adv.tolist()[0] == pytest.approx([(0.3 - 0.2) + 0.95 * 0.7, 1.0 - 0.3, 0.0])


def test_whiten():
    x, mask = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    w = whiten(x, mask)
    # mean 0 and the unbiased variance 1 over the three real entries (as TRL's masked_whiten)
    assert (w[:3].mean().item(), (w[:3] ** 2).sum().item() / 2) == pytest.approx((0.0, 1.0), abs=1e-5)
    assert w[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)


def test_ppo_policy_loss_clips_as_in_the_paper():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))   # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, clip_fraction, approx_kl = ppo_policy_loss(new, old, adv, mask, clip=0.2)
    # max(-A r, -A clip(r)): 1 x 1.5 -> clipped to 1.2; -1 x 0.5 -> clip 0.8 gives 0.8 > 0.5; 2 x 1.1 kept
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert clip_fraction.item() == pytest.approx(2 / 3)
    assert approx_kl.item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.1)) / 3)


def test_ppo_value_loss_clips_the_new_value():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.1]]), torch.tensor([[0.0, 0.5]])
    loss, fraction = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # step 1: clipped value 0.7: max(1.0, 0.49) = 1.0; step 2: clipped 0.0 (within 0.2): 0.25 both
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.25) / 2)
    assert fraction.item() == 0.0


def test_ppo_value_loss_takes_the_clipped_value_when_it_is_worse():
    # step 1: new 1.0 from old 0.0 is clipped to 0.2; the return is 1.0: max(0.0, 0.64) = 0.64
    # step 2: new -0.5 from old 0.0 clipped to -0.2; return -0.5: max(0.0, 0.09) = 0.09
    values, old, returns = torch.tensor([[1.0, -0.5, 3.0]]), torch.zeros(1, 3), torch.tensor([[1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])   # the third entry is padding
    loss, fraction = ppo_value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.09) / 2)
    assert fraction.item() == pytest.approx(1.0)


def test_gae_discounts_by_gamma_and_resets_at_each_rows_end():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.5, -0.2, 1.0, 0.0], [0.3, 2.0, 7.0, 7.0]])
    values = torch.tensor([[0.1, 0.4, -0.3, 0.0], [0.2, -0.1, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])   # rows end at different lengths
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    # row 0, three tokens
    d = [0.5 + gamma * 0.4 - 0.1, -0.2 + gamma * -0.3 - 0.4, 1.0 - (-0.3)]
    a2 = d[2]
    a1 = d[1] + gamma * lam * a2
    a0 = d[0] + gamma * lam * a1
    # row 1, two tokens: nothing after its end counts, whatever sits there
    e1 = 2.0 - (-0.1)
    e0 = 0.3 + gamma * -0.1 - 0.2 + gamma * lam * e1
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2, 0.0])
    assert adv.tolist()[1] == pytest.approx([e0, e1, 0.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.1, a1 + 0.4, a2 - 0.3, 0.0])


def test_token_rewards_with_holes_and_rows_of_different_lengths():
    mask = torch.tensor([[0, 0, 1, 1.0], [0, 1, 1, 0.0]])
    logp = torch.tensor([[9.0, 9.0, -1.0, -2.0], [9.0, -0.5, -3.0, 9.0]])
    ref = torch.tensor([[0.0, 0.0, -2.0, -1.0], [0.0, -1.0, -2.0, 0.0]])
    r = token_rewards(torch.tensor([1.5, -2.0]), logp, ref, mask, beta=0.2)
    assert r.tolist()[0] == pytest.approx([0, 0, -0.2, 0.2 + 1.5])
    assert r.tolist()[1] == pytest.approx([0, -0.1, 0.2 - 2.0, 0])


def test_ppo_advantages_are_whitened_gae_of_the_kl_penalised_rewards():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0.0], [0, 1, 1, 1.0]])
    score, logp, ref, values = torch.tensor([1.0, -0.5]), torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    adv, ret = ppo_advantages(score, logp, ref, values * mask, mask, beta=0.1, gamma=0.9, lam=0.8)
    raw, expected_returns = gae(token_rewards(score, logp, ref, mask, 0.1), values * mask, mask, 0.9, 0.8)
    real = adv[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert (real ** 2).sum().item() / (len(real) - 1) == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(adv, whiten(raw, mask) * mask) and torch.allclose(ret, expected_returns)
    assert not torch.allclose(adv, raw)


def test_dpo_needs_the_reference():
    # the policy prefers chosen by 1 nat more than the reference does: the implicit reward margin is beta x 1
    loss, chosen, rejected = dpo_loss(torch.tensor([-5.0]), torch.tensor([-6.0]), torch.tensor([-3.0]),
                                      torch.tensor([-5.0]), beta=0.5)
    # with the reference: 0.5 x ((-5 + 3) - (-6 + 5)) = -0.5
    assert loss.item() == pytest.approx(-math.log(sig(-0.5)))
    assert chosen.item() == pytest.approx(-1.0) and rejected.item() == pytest.approx(-0.5)


def test_dpo_loss_weighs_each_prompt_the_same():
    pc, pr = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0])
    rc, rr = torch.zeros(3), torch.zeros(3)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=1.0, group=torch.tensor([0, 0, 1]))
    prompt0 = (-math.log(sig(1.0)) - math.log(sig(0.0))) / 2
    assert loss.item() == pytest.approx((prompt0 - math.log(sig(-2.0))) / 2)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])


def test_rloo_advantages_leave_one_out():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])   # two prompts, k = 3, prompt-major
    adv = rloo_advantages(rewards, 3)
    assert adv.tolist() == pytest.approx([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])


def test_grpo_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])
    adv = grpo_advantages(rewards, 3)
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)   # sample standard deviation
    assert adv.tolist()[:3] == pytest.approx([(1 - 3) / (std + 1e-4), (2 - 3) / (std + 1e-4), (6 - 3) / (std + 1e-4)])
    assert adv.tolist()[3:] == [0.0, 0.0, 0.0]


def test_clipped_token_loss_by_hand():
    old = torch.zeros(2, 3)
    new = torch.log(torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 1.0]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.3, 0.0, 0.6]])
    loss, fraction = clipped_token_loss(new, old, adv, mask, clip=0.2, kl=kl, beta=0.5)
    # row 0 (A = 1): r 1.5 -> min(1.5, 1.2) = 1.2; r 0.9 -> 0.9; loss -(1.2 + 0.9)/2 + 0.5 x (0.1 + 0.2)/2
    row0 = -(1.2 + 0.9) / 2 + 0.5 * 0.3 / 2
    # row 1 (A = -2): -A r = 2r, the max of 2r and 2 clip(r): r 0.5 -> 1.6; r 1.1 -> 2.2; r 1 -> 2
    row1 = (1.6 + 2.2 + 2.0) / 3 + 0.5 * 0.9 / 3
    assert loss.item() == pytest.approx((row0 + row1) / 2)
    assert fraction.item() == pytest.approx(2 / 5)


def test_adaptive_kl_moves_beta_towards_the_target():
    from engine.rlhf.ppo import AdaptiveKL
    over, under, fixed = AdaptiveKL(0.1, 2.0, horizon=100), AdaptiveKL(0.1, 2.0, horizon=100), AdaptiveKL(0.1, None)
    over.update(3.0, 10)      # error clipped to +0.2: beta x (1 + 0.2 x 10 / 100)
    under.update(1.8, 10)     # error -0.1
    fixed.update(3.0, 10)
    assert over.beta == pytest.approx(0.1 * 1.02) and under.beta == pytest.approx(0.1 * 0.99)
    assert fixed.beta == 0.1


def test_ema_update():
    from engine.rlhf.ppo import ema_update
    average, model = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        average.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    ema_update(average, model, 0.75)
    assert average.weight.tolist() == [[1.5, 1.0]]


def test_clipped_sequence_loss_by_hand():
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.3, 0.2, 5.0], [-0.1, -0.2, -0.4]])   # 5.0 sits on padding
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, fraction = clipped_sequence_loss(new, old, adv, mask, clip=0.2)
    r0, r1 = math.exp(0.5), math.exp(-0.7)    # ratios of the summed log-probabilities
    # A = 2: min(2 r0, 2 x 1.2) = 2.4; A = -1: max(r1, 0.8) = 0.8 is the loss
    assert loss.item() == pytest.approx((-2.4 + 0.8) / 2)
    assert fraction.item() == 1.0 and r0 > 1.2 and r1 < 0.8
