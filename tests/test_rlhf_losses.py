"""RLHF losses against hand-computed values and the formulas of InstructGPT, TRL and PPO."""
import math

import pytest
import torch

from engine.rlhf.losses import (dpo_loss, gae, ppo_policy_loss, ppo_value_loss, reward_model_loss,
                                token_rewards, whiten)


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
    assert (w[:3].mean().item(), (w[:3] ** 2).mean().item()) == pytest.approx((0.0, 1.0), abs=1e-5)


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
