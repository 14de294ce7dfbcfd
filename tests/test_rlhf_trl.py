"""Parley's RLHF maths against TRL's formulas (tests/trl_reference.py, transcribed from TRL's
source with the version named there), on inputs where every term matters: gamma and lambda
below 1, ratios that clip, responses of different lengths and masks with holes.

Where Parley chose a convention TRL does not share, the test says so: the score sits on the
last response token (TRL <= 0.11 and lm-human-preferences; TRL 1.x puts it on the pad slot
after EOS), hence `legacy=True` for the PPO reward and GAE."""
import pytest
import torch

from engine.rlhf.losses import (clipped_sequence_loss, clipped_token_loss, dpo_loss, gae, grpo_advantages,
                                kl_estimate, ppo_advantages, ppo_policy_loss, ppo_value_loss, reward_model_loss,
                                rloo_advantages, token_rewards, whiten)
from engine.rlhf.ppo import AdaptiveKL
from trl_reference import (trl_adaptive_kl_update, trl_dpo_sigmoid_loss, trl_grpo_advantages, trl_grpo_loss,
                           trl_k3_kl, trl_masked_whiten, trl_ppo_gae, trl_ppo_policy_loss, trl_ppo_rewards,
                           trl_ppo_value_loss, trl_reward_loss, trl_rloo_advantages, trl_rloo_policy_loss,
                           trl_rloo_sequence_rewards)

B, T = 6, 9


@pytest.fixture
def batch():
    """Responses of lengths 9, 7, 5, 3, 1 and 6 (TRL's layout: each response from position 0)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 7, 5, 3, 1, 6])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return {"mask": mask.double(), "logp": rand(B, T) - 2, "ref": rand(B, T) - 2, "old": rand(B, T) * 0.3 - 2,
            "values": rand(B, T), "score": rand(B) * 2, "lengths": lengths}


def test_whitening_matches_trl(batch):
    holes = batch["mask"].clone()
    holes[0, 3] = holes[5, 1] = 0
    x = batch["values"] * 3 + 1
    assert torch.allclose(whiten(x, holes) * holes, trl_masked_whiten(x, holes) * holes)
    assert torch.allclose(whiten(x, holes, shift_mean=False) * holes,
                          trl_masked_whiten(x, holes, shift_mean=False) * holes)


def test_ppo_rewards_and_advantages_match_trl(batch):
    m, beta = batch["mask"], 0.07
    rewards = token_rewards(batch["score"], batch["logp"], batch["ref"], m, beta)
    expected = trl_ppo_rewards(batch["score"], batch["logp"], batch["ref"], m, kl_coef=beta, legacy=True)
    assert torch.allclose(rewards, expected * m)
    values = batch["values"] * m
    adv, ret = gae(rewards, values, m, gamma=0.9, lam=0.8)
    trl_adv, trl_ret = trl_ppo_gae(rewards, values, m, gamma=0.9, lam=0.8, whiten=False, legacy=True)
    assert torch.allclose(adv, trl_adv * m) and torch.allclose(ret, trl_ret * m)
    white, _ = ppo_advantages(batch["score"], batch["logp"], batch["ref"], values, m, beta, 0.9, 0.8)
    trl_white, _ = trl_ppo_gae(expected, values, m, gamma=0.9, lam=0.8, whiten=True, legacy=True)
    assert torch.allclose(white, trl_white * m)


def test_ppo_losses_match_trl(batch):
    m = batch["mask"].clone()
    m[1, 2] = 0   # a hole inside a response
    adv = batch["values"] * m
    loss, clip_fraction, approx_kl = ppo_policy_loss(batch["logp"] * 0.5 - 1, batch["old"], adv, m, clip=0.2)
    trl_loss, trl_clip, trl_kl = trl_ppo_policy_loss(batch["logp"] * 0.5 - 1, batch["old"], adv, m, 0.2, legacy=True)
    assert 0.1 < clip_fraction.item() < 0.9    # clipping triggers, but not everywhere
    assert torch.allclose(loss, trl_loss) and clip_fraction.item() == pytest.approx(trl_clip.item())
    assert torch.allclose(approx_kl, trl_kl)
    returns, old_values = batch["score"][:, None].expand(B, T) * m, batch["ref"] * 0.2 * m
    vf, vf_clip = ppo_value_loss(batch["values"], old_values, returns, m, clip=0.2)
    trl_vf, trl_vf_clip = trl_ppo_value_loss(batch["values"], old_values, returns, m, 0.2)
    assert 0.1 < vf_clip.item() < 0.9
    assert torch.allclose(vf, trl_vf) and vf_clip.item() == pytest.approx(trl_vf_clip.item())


def test_dpo_and_reward_losses_match_trl(batch):
    pc, pr, rc, rr = batch["logp"][:, 0] * 5, batch["logp"][:, 1] * 5, batch["ref"][:, 0] * 5, batch["ref"][:, 1] * 5
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.3)
    losses, trl_chosen, trl_rejected = trl_dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.3)
    assert torch.allclose(loss, losses.mean()) and torch.allclose(chosen, trl_chosen)
    assert torch.allclose(rejected, trl_rejected)
    rm_loss, _, _ = reward_model_loss(batch["score"], batch["values"][:, 0])
    assert torch.allclose(rm_loss, trl_reward_loss(batch["score"], batch["values"][:, 0]))


def test_rloo_matches_trl(batch):
    m, k = batch["mask"], 3
    rewards = batch["score"] - 0.05 * (kl_estimate(batch["logp"], batch["ref"], "k1") * m).sum(1)
    assert torch.allclose(rewards, trl_rloo_sequence_rewards(batch["score"], batch["logp"], batch["ref"], m, 0.05))
    adv = rloo_advantages(rewards, k)
    assert torch.allclose(adv, trl_rloo_advantages(rewards, k, layout="prompt_major"))
    new = batch["logp"] * 0.1 + batch["old"]
    loss, _ = clipped_sequence_loss(new, batch["old"], adv, m, clip=0.2)
    assert torch.allclose(loss, trl_rloo_policy_loss(new, batch["old"], adv, m, 0.2))


def test_grpo_matches_trl(batch):
    m, k = batch["mask"], 3
    adv = grpo_advantages(batch["score"], k)
    assert torch.allclose(adv, trl_grpo_advantages(batch["score"], k))
    new = batch["logp"] * 0.1 + batch["old"]
    kl = kl_estimate(new, batch["ref"], "k3")
    assert torch.allclose(kl, trl_k3_kl(new, batch["ref"]))
    loss, fraction = clipped_token_loss(new, batch["old"], adv, m, clip=0.2, kl=kl, beta=0.04)
    assert 0.0 < fraction.item() < 1.0
    expected = trl_grpo_loss(new, batch["old"], batch["ref"], adv, m, beta=0.04, epsilon_low=0.2, loss_type="grpo")
    assert torch.allclose(loss, expected)


def test_adaptive_kl_matches_trl():
    for kl in (0.5, 1.9, 2.0, 2.3, 9.0):
        controller = AdaptiveKL(0.1, 2.0, horizon=500)
        controller.update(kl, 64)
        assert controller.beta == pytest.approx(trl_adaptive_kl_update(0.1, kl, 64, 2.0, 500))
