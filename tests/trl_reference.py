"""Reference transcriptions of TRL's RLHF formulas, as small pure-PyTorch functions.

Transcribed by hand (read, not imported) from huggingface/trl so that Parley's tests can
check engine/rlhf numerically against what TRL computes. Only torch is needed; trl is never
imported. Sources read (tag -> commit):

    v1.9.0  35def3ee000a87f6839e66f4b7749b06274ed1b3  (latest release; PPO is trl/experimental/ppo)
    v0.25.0 55f5433e15cc6203d3c731f9de5247b00878bebd  (last DPOTrainer.dpo_loss method)
    v0.21.0 / v0.19.0 5b3ea9dd43b526f188ef8f63ca16bbe977ec8603  (last `rloo_k` RLOOTrainer)
    v0.11.0 e4935e13fcda106485ed5c85678c6f0bb0d1d10b  (legacy PPOTrainer, AdaptiveKLController)

Conventions: per-token tensors are [batch, T] over the *response only* (index 0 = first
generated token), as TRL's `responses`/`logprobs`/`values` are. Masks are 0/1 (float or bool),
1 on response tokens. TRL's PPO/RLOO(<=0.21) describe the response by `sequence_lengths`, which
despite its name is the INDEX OF THE LAST valid token (first pad index - 1), so a length-n
response has sequence_lengths = n - 1; `trl_sequence_lengths` converts a prefix mask to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INVALID_LOGPROB = 1.0  # trl/experimental/ppo/ppo_trainer.py (v1.9.0): fill value for logprobs at padding


# --------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------

def trl_masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """`masked_mean`, trl/experimental/ppo/ppo_trainer.py v1.9.0 (= trl/core.py v0.11-v0.19).

    sum(values * mask) / sum(mask), over everything or along `axis`. No clamp: an all-zero
    mask gives nan (0/0), as in TRL."""
    mask = mask.to(values.dtype)
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """`masked_var`, same file/version. Global (not per-row) masked variance; with
    `unbiased` (TRL's default, and what masked_whiten uses) it is multiplied by the Bessel
    factor n/(n-1), n = mask.sum(). TRL raises when n == 0; n == 1 divides by zero (inf)."""
    mean = trl_masked_mean(values, mask)
    variance = trl_masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.to(values.dtype).sum()
        if mask_sum == 0:
            raise ValueError("The sum of the mask is zero (TRL raises here too)")
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def trl_masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`masked_whiten`, same file/version: (values - mean) * rsqrt(var + 1e-8) with the masked
    mean and the UNBIASED masked variance; shift_mean=False adds the mean back. Every entry is
    transformed, masked-out ones included (callers zero them afterwards if they want)."""
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# --------------------------------------------------------------------------------------------
# KL estimators and controller
# --------------------------------------------------------------------------------------------

def trl_k1_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref_logp (PPO's default `kl_estimator="k1"`: `-logr` with
    logr = ref - logp, ppo_trainer.py v1.9.0; also RLOO v1.9.0 and legacy PPO `kl_penalty="kl"`)."""
    return logp - ref_logp


def trl_k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1 (always >= 0). GRPOTrainer._compute_loss v1.9.0
    (`per_token_kl`), and PPO with kl_estimator="k3" written there as (exp(logr) - 1) - logr."""
    logr = ref_logp - logp
    return torch.exp(logr) - logr - 1


def trl_adaptive_kl_update(value: float, current_kl: float, n_steps: float, target: float,
                           horizon: float) -> float:
    """`AdaptiveKLController.update`, trl/trainer/utils.py v0.11.0 (Ziegler et al. 2019; removed
    with the legacy PPOTrainer - PPO since v0.11's PPOv2 uses a fixed kl_coef):
        err = clip(current / target - 1, -0.2, 0.2); value *= 1 + err * n_steps / horizon.
    Legacy PPOTrainer calls it with current = mean over the batch of the summed per-token KL
    (`objective/kl`) and n_steps = batch_size * num_processes; defaults init 0.2, target 6,
    horizon 10000."""
    proportional_error = min(max(float(current_kl) / target - 1, -0.2), 0.2)
    return float(value) * (1 + proportional_error * n_steps / horizon)


# --------------------------------------------------------------------------------------------
# PPO (trl/experimental/ppo/ppo_trainer.py v1.9.0, PPOTrainer.train; identical in
# trl/trainer/ppo_trainer.py v0.12-v0.23 and ppov2_trainer.py v0.11). `legacy=True` switches
# to the pre-0.12 PPOTrainer (trl/trainer/ppo_trainer.py v0.11.0).
# --------------------------------------------------------------------------------------------

def trl_sequence_lengths(mask: torch.Tensor) -> torch.Tensor:
    """TRL's `sequence_lengths` (index of the last response token, -1 if empty) from a 0/1
    response mask that must be a prefix (1..1 0..0), which is how TRL lays responses out
    (`first_true_indices(response == pad) - 1` after `truncate_response`)."""
    m = (mask > 0).long()
    if m.shape[1] > 1 and bool((m[:, 1:] > m[:, :-1]).any()):
        raise ValueError("TRL's PPO/RLOO assume a prefix response mask (1..1 then 0..0)")
    return m.sum(1) - 1


def _lengths(mask_or_lengths: torch.Tensor) -> torch.Tensor:
    if mask_or_lengths.dim() == 1:
        return mask_or_lengths.long()
    return trl_sequence_lengths(mask_or_lengths)


def trl_ppo_padding_masks(mask_or_lengths: torch.Tensor, T: int):
    """(padding_mask, padding_mask_p1), bool, True = padding, as PPOTrainer builds them:
    padding_mask = idx > seq_len (policy side: response tokens only);
    padding_mask_p1 = idx > seq_len + 1 (value side: ONE EXTRA position, the first pad slot,
    is kept - it is where the score lands, see trl_ppo_rewards)."""
    L = _lengths(mask_or_lengths)
    idx = torch.arange(T, device=L.device).repeat(L.shape[0], 1)
    return idx > L.unsqueeze(1), idx > (L + 1).unsqueeze(1)


def trl_missing_eos_penalty(scores: torch.Tensor, contain_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """`scores[~contain_eos_token] -= missing_eos_penalty` (PPO v1.9.0; default None = off).
    TRL subtracts; lm-human-preferences / the N-details write-up REPLACE the score by -1."""
    if penalty is None:
        return scores
    scores = scores.clone()
    scores[~contain_eos.bool()] -= penalty
    return scores


def trl_ppo_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    mask_or_lengths: torch.Tensor, kl_coef: float = 0.05, kl_estimator: str = "k1",
                    whiten_rewards: bool = False, legacy: bool = False,
                    kl_penalty: str = "kl") -> torch.Tensor:
    """Per-token rewards (PPOTrainer.train steps "4. compute rewards" / "5. whiten rewards").

    Current TRL (v1.9.0): logprobs and ref_logprobs at padding (idx > seq_len) are set to
    INVALID_LOGPROB=1.0, so the KL there is exactly 0; rewards = -kl_coef * kl, then
        actual_end = seq_len + 1 if seq_len + 1 < T else seq_len;  rewards[i, actual_end] += score
    i.e. the score goes to the FIRST PAD SLOT after the last response token (EOS), and only
    onto the last token itself when the response fills all T positions (trl#1893, #3750).
    whiten_rewards (default False): masked_whiten over ~padding_mask_p1 with shift_mean=False,
    then positions > seq_len + 1 refilled with 0. `mask_or_lengths`: prefix mask or seq_len.

    legacy=True (v0.11.0 PPOTrainer.compute_rewards): `mask` is any 0/1 mask (prompt zeros
    allowed); kl = logp - ref ("kl"), |.| ("abs") or 0.5*(.)^2 ("mse"), UNMASKED;
    reward = -kl_coef * kl with the score added at the last nonzero mask position
    (`mask.nonzero()[-1]`). Masking happens later in GAE (use trl_ppo_gae(legacy=True))."""
    if legacy:
        if whiten_rewards:
            raise ValueError("legacy TRL whitens rewards inside compute_advantages: trl_ppo_gae(legacy=True)")
        diff = logprobs - ref_logprobs
        kl = {"kl": diff, "abs": diff.abs(), "mse": 0.5 * diff.square()}[kl_penalty]
        rewards = -kl_coef * kl
        rewards = rewards.clone()
        for i in range(rewards.shape[0]):
            last = mask_or_lengths[i].nonzero()[-1]
            rewards[i, last] += scores[i]
        return rewards
    T = logprobs.shape[1]
    L = _lengths(mask_or_lengths)
    padding_mask, padding_mask_p1 = trl_ppo_padding_masks(L, T)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    if kl_estimator == "k1":
        kl = trl_k1_kl(logprobs, ref_logprobs)
    elif kl_estimator == "k3":
        kl = trl_k3_kl(logprobs, ref_logprobs)
    else:
        raise ValueError(kl_estimator)
    rewards = (-kl_coef * kl).clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    L_p1 = L + 1
    actual_end = torch.where(L_p1 < rewards.size(1), L_p1, L)
    rewards[actual_start, actual_end] += scores.to(rewards.dtype)
    if whiten_rewards:
        rewards = trl_masked_whiten(rewards, ~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    return rewards


def trl_ppo_gae(rewards: torch.Tensor, values: torch.Tensor, mask_or_lengths: torch.Tensor,
                gamma: float = 1.0, lam: float = 0.95, whiten: bool = True, legacy: bool = False,
                whiten_rewards: bool = False):
    """(advantages, returns) as PPOTrainer.train step "6. compute advantages and returns".

    Current TRL (v1.9.0): values are zeroed where idx > seq_len + 1 (the first pad slot keeps
    its value: V(state after EOS) bootstraps the score placed there); rewards are used AS GIVEN
    (TRL's are already 0 past seq_len + 1). GAE runs over all T positions:
        nextvalues = values[:, t+1] (0 at t = T-1); delta = r_t + gamma*nextvalues - V_t;
        lastgaelam = delta + gamma*lam*lastgaelam
    with no done/mask handling inside the loop. returns = raw advantages + (zeroed) values -
    so returns are nonzero at seq_len + 1 and the value loss covers it. whiten=True (TRL
    always does): advantages = masked_whiten(adv, ~padding_mask) (unbiased var, shift_mean),
    then refilled with 0 where idx > seq_len. gamma=1, lam=0.95 are TRL's defaults.

    legacy=True (v0.11.0 PPOTrainer.compute_advantages, any 0/1 mask): values*=mask,
    rewards*=mask, optional masked_whiten(rewards, mask, shift_mean=False), the same loop,
    returns = adv + values, advantages = masked_whiten(adv, mask) WITHOUT refilling zeros."""
    if legacy:
        m = mask_or_lengths.to(values.dtype)
        values = values * m
        rewards = rewards * m
        if whiten_rewards:
            rewards = trl_masked_whiten(rewards, m, shift_mean=False)
    else:
        if whiten_rewards:
            raise ValueError("current TRL whitens rewards in the reward step: trl_ppo_rewards(whiten_rewards=True)")
        padding_mask, padding_mask_p1 = trl_ppo_padding_masks(mask_or_lengths, values.shape[1])
        values = torch.masked_fill(values, padding_mask_p1, 0)
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    if whiten:
        if legacy:
            advantages = trl_masked_whiten(advantages, m)
        else:
            advantages = trl_masked_whiten(advantages, ~padding_mask)
            advantages = torch.masked_fill(advantages, padding_mask, 0)
    return advantages, returns


def trl_ppo_policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float = 0.2, legacy: bool = False):
    """(pg_loss, pg_clipfrac, approxkl), PPOTrainer.train minibatch loop (v1.9.0).

    `mask` = response tokens (TRL: ~padding_mask). ratio = exp(new - old);
    pg_loss = masked_mean(max(-A*ratio, -A*clamp(ratio, 1-c, 1+c)), mask);
    pg_clipfrac = masked_mean(pg_losses2 > pg_losses, mask);
    approxkl = 0.5 * (new - old)^2 .mean() over ALL B*T entries, unmasked: TRL fills both
    logprob tensors with INVALID_LOGPROB at padding, so padding contributes zeros to the sum
    but counts in the denominator (mirrored here). legacy=True (v0.11.0 PPOTrainer.loss):
    approxkl = 0.5 * masked_mean((new - old)^2, mask), no fill."""
    m = mask > 0
    if not legacy:
        new_logprobs = torch.masked_fill(new_logprobs, ~m, INVALID_LOGPROB)
        old_logprobs = torch.masked_fill(old_logprobs, ~m, INVALID_LOGPROB)
    logprobs_diff = new_logprobs - old_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = trl_masked_mean(torch.max(pg_losses, pg_losses2), m)
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), m)
    if legacy:
        approxkl = 0.5 * trl_masked_mean(logprobs_diff ** 2, m)
    else:
        approxkl = 0.5 * (logprobs_diff ** 2).mean()
    return pg_loss, pg_clipfrac, approxkl


def trl_ppo_value_loss(vpred: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, cliprange_value: float = 0.2):
    """(vf_loss, vf_clipfrac), PPOTrainer.train (v1.9.0; same formula in legacy v0.11.0).

    vpred is zeroed outside `mask`; vpredclipped = clamp(vpred, old - c, old + c);
    vf_loss = 0.5 * masked_mean(max((vpred - R)^2, (vpredclipped - R)^2), mask);
    vf_clipfrac = masked_mean((vpredclipped - R)^2 > (vpred - R)^2, mask).
    NOTE current TRL's value mask is ~padding_mask_p1 = response tokens PLUS the first pad slot
    (trl_ppo_padding_masks(...)[1]); legacy TRL uses the plain response mask."""
    m = mask > 0
    vpred = torch.masked_fill(vpred, ~m, 0)
    vpredclipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * trl_masked_mean(torch.max(vf_losses1, vf_losses2), m)
    vf_clipfrac = trl_masked_mean((vf_losses2 > vf_losses1).float(), m)
    return vf_loss, vf_clipfrac


# --------------------------------------------------------------------------------------------
# DPO and reward model
# --------------------------------------------------------------------------------------------

def trl_dpo_sigmoid_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                         ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                         beta: float = 0.1, label_smoothing: float = 0.0):
    """(losses [B], chosen_rewards, rejected_rewards): DPOTrainer.dpo_loss, loss_type="sigmoid",
    trl/trainer/dpo_trainer.py v0.25.0 (reverse-KL, reference used):
        logits = (pi_c - pi_r) - (ref_c - ref_r)
        losses = -logsigmoid(beta*logits)*(1-ls) - logsigmoid(-beta*logits)*ls   (cDPO when ls>0)
        chosen_rewards = beta*(pi_c - ref_c).detach(), rejected likewise.
    v1.9.0 DPOTrainer._compute_loss gives the same for ls=0 (-logsigmoid(beta*delta_score); its
    "sigmoid" no longer reads label_smoothing). The trainer's loss is losses.mean(). Inputs
    are SUMMED completion log-probs (per_token_logps zeroed off the completion, .sum(1))."""
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def trl_reward_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor,
                    margin: torch.Tensor | None = None,
                    center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """RewardTrainer.compute_loss, trl/trainer/reward_trainer.py v1.9.0:
        loss = -logsigmoid(r_c - r_r [- margin]).mean()
        (+ center_rewards_coefficient * mean((r_c + r_r)^2) when set; default None).
    A plain mean over pairs (no per-prompt grouping)."""
    diff = rewards_chosen - rewards_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss


# --------------------------------------------------------------------------------------------
# RLOO
# --------------------------------------------------------------------------------------------

def trl_rloo_sequence_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                              mask: torch.Tensor, kl_coef: float = 0.05) -> torch.Tensor:
    """score - kl_coef * sum_t (logp - ref) * mask: the KL is k1, summed per SEQUENCE and folded
    into the scalar reward. RLOOTrainer v1.9.0 (`rewards - self.beta * kl`, kl from
    old_per_token_logps; beta default 0.05). v0.19.0 gives the same number in both of its
    modes: token_level_kl=False does exactly this; token_level_kl=True puts -kl_coef*kl per
    token plus the score on one token, then sums over the sequence."""
    return scores - kl_coef * ((logprobs - ref_logprobs) * mask).sum(-1)


def trl_rloo_advantages(rewards: torch.Tensor, k: int, layout: str = "prompt_major",
                        normalize_advantages: bool = False, eps: float | None = None) -> torch.Tensor:
    """Leave-one-out advantages A_i = r_i - (sum_group - r_i)/(k - 1), flat [num_prompts*k].

    layout="prompt_major": the k samples of a prompt are CONSECUTIVE ([prompts, k] flattened,
        RepeatSampler): RLOOTrainer v0.22+ / v1.9.0 (`rewards.view(-1, num_generations)`);
        normalize: (A - mean) / (std + 1e-4), std unbiased (nanstd); k == 1 gives zeros.
    layout="k_major": sample j of prompt p sits at j*num_prompts + p ([k, prompts] flattened,
        `queries.repeat(rloo_k, 1)` then `rlhf_reward.reshape(rloo_k, -1)`): RLOOTrainer
        v0.11-v0.21 (`rloo_k`); normalize: (A - mean) / (std + 1e-8), torch.std (unbiased).
    Normalisation (default off in both) is over the whole batch, not per group. v1.9.0 also
    skips NaN (unscorable) rewards in the baseline; not modelled here."""
    if layout == "prompt_major":
        grouped = rewards.view(-1, k)
        if k > 1:
            baselines = ((grouped.sum(1, keepdim=True) - grouped) / (k - 1)).view(-1)
            advantages = rewards - baselines
        else:
            advantages = torch.zeros_like(rewards)
        if normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + (1e-4 if eps is None else eps))
        return advantages
    if layout == "k_major":
        grouped = rewards.reshape(k, -1)
        baseline = (grouped.sum(0) - grouped) / (k - 1)
        advantages = (grouped - baseline).flatten()
        if normalize_advantages:
            advantages = (advantages - advantages.mean()) / (advantages.std() + (1e-8 if eps is None else eps))
        return advantages
    raise ValueError(layout)


def trl_rloo_policy_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor,
                         advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float = 0.2,
                         epsilon_high: float | None = None) -> torch.Tensor:
    """RLOOTrainer._compute_loss v1.9.0: a SEQUENCE-level ratio
    exp(sum_t logp*mask - sum_t old*mask), loss = mean_i -min(ratio*A, clamp(ratio, 1-el,
    1+eh)*A); epsilon_high defaults to epsilon (0.2). v0.19.0 is the same with symmetric
    cliprange (written as max(-A*ratio, -A*clamped).mean())."""
    if epsilon_high is None:
        epsilon_high = epsilon_low
    logps = (per_token_logps * mask).sum(1)
    old_logps = (old_per_token_logps * mask).sum(1)
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    return (-torch.min(coef_1 * advantages, coef_2 * advantages)).mean()


# --------------------------------------------------------------------------------------------
# GRPO (trl/trainer/grpo_trainer.py v1.9.0; v0.19.0 where noted)
# --------------------------------------------------------------------------------------------

def _nanstd(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """trl/trainer/utils.py `nanstd` v1.9.0: NaN-ignoring std WITH Bessel's correction."""
    if dim is None:
        mean = torch.nanmean(t)
        var = torch.nanmean((t - mean) ** 2)
        count = (~torch.isnan(t)).sum()
    else:
        mean = torch.nanmean(t, dim=dim, keepdim=True)
        var = torch.nanmean((t - mean) ** 2, dim=dim)
        count = (~torch.isnan(t)).sum(dim=dim)
    corr = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    return torch.sqrt(var * corr)


def trl_grpo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards="group") -> torch.Tensor:
    """GRPOTrainer._generate_and_score_completions, multi_objective_aggregation
    "sum_then_normalize" (default), v1.9.0. Layout [prompts, G] flattened (a prompt's G
    completions are consecutive; `rewards.view(-1, G)`, `repeat_interleave`):
        A = r - mean_group;  A /= (std + 1e-4) unless scale_rewards == "none"
    std is UNBIASED (Bessel; torch.std in v0.19, nanstd in v1.9). scale_rewards: "group"
    (default; per-group std), "batch" (std over the whole batch, mean still per group), "none"
    (Dr. GRPO). Booleans are v0.19's form (True = "group", False = "none"). NaN -> 0 at the end."""
    if scale_rewards is True:
        scale_rewards = "group"
    elif scale_rewards is False:
        scale_rewards = "none"
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size, dim=0)
    if scale_rewards in ("group", "none"):
        std = (_nanstd(grouped, dim=1).repeat_interleave(group_size, dim=0) if group_size > 1
               else torch.zeros_like(rewards))
    elif scale_rewards == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(scale_rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_grpo_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None,
                  ref_per_token_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
                  beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float | None = None,
                  loss_type: str = "grpo", max_completion_length: int | None = None,
                  num_items_in_batch: float | None = None, delta: float | None = None,
                  importance_sampling_level: str = "token") -> torch.Tensor:
    """GRPOTrainer._compute_loss v1.9.0 (one process, no gradient accumulation, no vLLM IS
    correction / entropy / off-policy masks).

    coef_1 = exp(logp - old) per token (old None -> logp.detach(), i.e. ratio 1, TRL's
    num_iterations=1 shortcut); "sequence" level uses the masked-mean log-ratio per sequence.
    coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high) (eps_high defaults to eps_low);
    delta (default None) caps coef_1 from above (two-sided clipping).
    per_token_loss = -min(coef_1*A, coef_2*A) + beta * k3(logp, ref)   (A broadcast per row;
    KL vs the CURRENT policy logp, added to the loss, not the reward; beta default 0.0).
    Aggregation:
      "grpo":    mean_i( sum_t(l*m) / clamp(sum_t m, 1) )            (per-sequence mean, then mean)
      "bnpo":    sum(l*m) / clamp(sum(m), 1)                          (token mean over the batch)
      "dr_grpo": sum(l*m) / (B * max_completion_length)               (TRL uses the CONFIG value,
                 default 256; here it defaults to T = mask.size(1))
      "dapo":    sum(l*m) / clamp(num_items_in_batch, 1)  (TRL: completion tokens across the whole
                 accumulated global batch / num_processes; defaults here to mask.sum(), = bnpo).
    v1.9.0's default loss_type is "dapo"; v0.19's was "bnpo" (same formulas for these types)."""
    if epsilon_high is None:
        epsilon_high = epsilon_low
    mask = mask.to(per_token_logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_iw = log_ratio
    elif importance_sampling_level == "sequence":
        log_iw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(importance_sampling_level)
    coef_1 = torch.exp(log_iw)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * trl_k3_kl(per_token_logps, ref_per_token_logps)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        L = mask.size(1) if max_completion_length is None else max_completion_length
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * L)
    if loss_type == "dapo":
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
        return (per_token_loss * mask).sum() / n.clamp(min=1.0)
    raise ValueError(loss_type)


if __name__ == "__main__":
    # tiny smoke check: one response of 2 tokens in T=4, score 1, no KL
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    lp = torch.zeros(1, 4)
    r = trl_ppo_rewards(torch.tensor([1.0]), lp, lp, mask, kl_coef=0.1)
    assert torch.equal(r, torch.tensor([[0.0, 0.0, 1.0, 0.0]])), r   # score on the first pad slot
    adv, ret = trl_ppo_gae(r, torch.zeros(1, 4), mask, gamma=1.0, lam=1.0, whiten=False)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]])), ret
    assert torch.allclose(trl_grpo_advantages(torch.tensor([1.0, 0.0]), 2),
                          torch.tensor([0.5, -0.5]) / (2 ** -0.5 + 1e-4))
    print("ok")
