"""The losses of RLHF as plain functions on tensors, after InstructGPT, TRL and "The N
Implementation Details of RLHF with PPO". Masks are 1 for response tokens, 0 elsewhere.
"""
import torch
import torch.nn.functional as F


def reward_model_loss(chosen: torch.Tensor, rejected: torch.Tensor, group: torch.Tensor | None = None):
    """-1/C(K,2) sum log sigmoid(r(x, y_w) - r(x, y_l)) per prompt, averaged over prompts.

    `group` [pairs] names the prompt of each pair: InstructGPT puts all C(K,2) pairs of one prompt
    in one batch element, so each prompt weighs the same however many pairs it has. Returns
    (loss, accuracy, mean margin)."""
    margin = chosen - rejected
    per_pair = -F.logsigmoid(margin)
    if group is None:
        loss = per_pair.mean()
    else:
        _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
        per_prompt = torch.zeros(len(counts), dtype=per_pair.dtype, device=per_pair.device)
        per_prompt.index_add_(0, inverse, per_pair)
        loss = (per_prompt / counts).mean()
    return loss, (margin > 0).float().mean(), margin.mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1):
    """DPO's sigmoid loss (Rafailov et al. 2023) on sequence log-probabilities.
    Returns (loss, chosen reward, rejected reward): the rewards are beta x log(pi / pi_ref)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, chosen_reward.detach(), rejected_reward.detach()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def token_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """Per-token reward: -beta (log pi - log pi_ref) at every response token, plus the reward
    model's score at the last one."""
    rewards = -beta * (logprobs - ref_logprobs) * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()   # the last response token
    return rewards + last * score[:, None]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over response tokens; returns (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)
        advantages[:, t] = last * mask[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2):
    """PPO's clipped surrogate; returns (loss, clip fraction, approximate KL old -> new)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """The critic's loss, with the new value kept within `clip` of the old one (as in PPO2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    return loss, masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask)
