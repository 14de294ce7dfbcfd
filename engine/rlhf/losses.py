"""The losses of RLHF as plain functions on tensors, after InstructGPT, TRL and "The N
Implementation Details of RLHF with PPO". Masks are 1 for response tokens, 0 elsewhere.
"""
import torch
import torch.nn.functional as F


def per_prompt_mean(per_pair: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
    """The mean over prompts of each prompt's mean over its pairs (`group` [pairs] names each
    pair's prompt): InstructGPT puts all C(K,2) pairs of one prompt in one batch element, so each
    prompt weighs the same however many pairs it has. Without `group`, the mean over pairs."""
    if group is None:
        return per_pair.mean()
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    per_prompt = torch.zeros(len(counts), dtype=per_pair.dtype, device=per_pair.device)
    per_prompt.index_add_(0, inverse, per_pair)
    return (per_prompt / counts).mean()


def reward_model_loss(chosen: torch.Tensor, rejected: torch.Tensor, group: torch.Tensor | None = None):
    """-1/C(K,2) sum log sigmoid(r(x, y_w) - r(x, y_l)) per prompt, averaged over prompts.
    Returns (loss, accuracy, mean margin)."""
    margin = chosen - rejected
    return per_prompt_mean(-F.logsigmoid(margin), group), (margin > 0).float().mean(), margin.mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, group: torch.Tensor | None = None):
    """DPO's sigmoid loss (Rafailov et al. 2023) on sequence log-probabilities, averaged per prompt
    as the reward model's is. Returns (loss, chosen reward, rejected reward): the rewards are
    beta x log(pi / pi_ref)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = per_prompt_mean(-F.logsigmoid(chosen_reward - rejected_reward), group)
    return loss, chosen_reward.detach(), rejected_reward.detach()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked entries. The variance is the
    unbiased one, as TRL's masked_whiten (lm-human-preferences divides by n, to match TensorFlow;
    on a batch of hundreds of tokens the two differ by well under 1%)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
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


def ppo_advantages(score, logprobs, ref_logprobs, values, mask, beta: float, gamma: float = 1.0, lam: float = 0.95):
    """PPO's targets from one rollout: per-token rewards (KL penalty, score at the last token),
    GAE on the critic's values, advantages whitened over the batch's response tokens. Returns
    (advantages, returns)."""
    rewards = token_rewards(score, logprobs, ref_logprobs, mask, beta)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return whiten(advantages, mask) * mask, returns


# -- critic-free methods: k replies per prompt, rows prompt-major (row i * k + j) -------------------
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) on tokens sampled from pi (Schulman's k1 and k3):
    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = exp(-k1) - 1 + k1 (unbiased, never
    negative, lower variance: what GRPO uses)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use k1 or k3")


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each reply's reward minus the mean reward of
    the other k - 1 replies to its prompt."""
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).flatten()


def grpo_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each reply's reward normalised within its prompt's group, by the
    group's mean and (sample) standard deviation; eps as TRL, so equal rewards give 0."""
    grouped = rewards.view(-1, k)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)).flatten()


def clipped_sequence_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2):
    """RLOO's clipped surrogate, as TRL's RLOOTrainer: one ratio per sequence, of its summed
    log-probabilities, and the mean over sequences. Returns (loss, clip fraction)."""
    ratio = torch.exp(((logprobs - old_logprobs) * mask).sum(1))
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    return loss, ((ratio - 1).abs() > clip).float().mean()


def clipped_token_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2, kl=None, beta: float = 0.0):
    """The clipped surrogate with one advantage per sequence [B] at each of its tokens, plus
    beta x a per-token KL [B, T] if given; each sequence's mean over its tokens, then the mean over
    sequences (GRPO's original aggregation). Returns (loss, clip fraction)."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages[:, None]
    per_token = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    if kl is not None:
        per_token = per_token + beta * kl
    per_sequence = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    clipped = ((ratio - 1).abs() > clip).float()
    return per_sequence.mean(), masked_mean(clipped, mask)
