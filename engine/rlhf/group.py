"""`parley train rloo` and `parley train grpo`: policy gradients with k replies per prompt and no
critic (the online methods TRL keeps in its stable API beside PPO).

Each step samples k replies to each of `prompts_per_step` prompts in one batched rollout
(engine.rlhf.rollout) and scores them with the reward model (normalised as for PPO). The other
replies to the same prompt are the baseline:

- RLOO (Ahmadian et al. 2024): the reward is the score minus beta x the sequence's KL to the
  reference (summed over its tokens, estimator k1 by default: the KL penalty of InstructGPT);
  the advantage is the reward minus the mean reward of the prompt's other k - 1 replies;
- GRPO (Shao et al. 2024): the advantage is the score normalised by its group's mean and
  standard deviation, and the KL (estimator k3 by default, per token) is added to the loss with
  weight beta instead of to the reward.

Both then take `epochs` passes of a clipped surrogate over minibatches of whole prompts; with
one pass the ratio is 1 and this is REINFORCE with the baseline above. As in TRL, RLOO clips one
ratio per reply (of its summed log-probabilities) and GRPO one per token, each reply weighing
the same (GRPO's original aggregation: the mean over a reply's tokens, then over replies). beta
is fixed, or adapted towards `target_kl` as in PPO.
"""
import random

import torch

from engine import lora
from engine.errors import ParleyError
from engine.rlhf.losses import clipped_sequence_loss, clipped_token_loss, grpo_advantages, kl_estimate, rloo_advantages
from engine.rlhf.ppo import SHOWN, AdaptiveKL, normalise_rewards
from engine.rlhf.rollout import held_out, online_batch, start_online
from engine.train import distributed
from engine.train.config import GroupConfig
from engine.train.logprobs import token_logprobs
from engine.train.run import Run


def group_advantages(method: str, score, logprobs, ref_logprobs, mask, k: int, beta: float, estimator: str):
    """The advantage of each reply [B]: RLOO's on the KL-penalised reward, GRPO's on the score."""
    if method == "rloo":
        kl = (kl_estimate(logprobs, ref_logprobs, estimator) * mask).sum(1)
        return rloo_advantages(score - beta * kl, k)
    return grpo_advantages(score, k)


def train_group(c: GroupConfig, store=None):
    """RLOO or GRPO, as c.mode says."""
    method, k = c.mode, c.replies
    if k < 2:
        raise ParleyError(f"--replies {k}: {method.upper()} needs at least 2 replies per prompt to compare")
    minibatch_prompts = c.minibatch_prompts or c.prompts_per_step
    run = Run(c, c.policy, store, shown=SHOWN)
    torch.manual_seed(c.seed)
    lm, rm, reference, sampling, train, heldout = start_online(c, run, store)
    actor = lm.model
    optimizer = torch.optim.AdamW(lora.trainable(actor), lr=c.lr, weight_decay=0.0)
    modules = {"actor": lora.checkpointed(actor)}
    state = run.restore(optimizer, modules)
    normalise_rewards(state, lm, rm, train, sampling, c.seed)
    kl_control = AdaptiveKL(state.get("beta", c.beta), c.target_kl)
    trained = run.parallel(actor)
    with run:
        for step in range(run.start, c.max_steps):
            rng = random.Random(c.seed * 1_000_003 + step)   # every step a function of (seed, step): resumable
            batch = [rng.choice(train) for _ in range(c.prompts_per_step)]
            r, score, old_logprobs, ref_logprobs, kl = online_batch(
                lm, reference, rm, run, batch, k, sampling, c.seed * 100003 + step * 997, c.missing_eos_penalty,
                c.score_clip)
            ids, pad_mask, mask = r.ids, r.pad_mask, r.targets
            advantages = group_advantages(method, score, old_logprobs, ref_logprobs, mask, k, kl_control.beta,
                                          c.kl_estimator)
            stats = dict.fromkeys(("policy_loss", "clip_fraction", "grad_norm"), 0.0)
            updates = 0
            for _ in range(c.epochs):
                order = torch.randperm(c.prompts_per_step,
                                       generator=torch.Generator().manual_seed(rng.randrange(2**31)))
                for first in range(0, c.prompts_per_step, minibatch_prompts):
                    rows = [p * k + j for p in order[first:first + minibatch_prompts].tolist() for j in range(k)]
                    mb = torch.tensor(run.share(rows), device=lm.device)
                    share = len(mb) / len(rows)
                    logprobs = token_logprobs(trained, ids[mb], pad_mask[mb], mask[mb], c.temperature)
                    if method == "rloo":
                        loss, clip_fraction = clipped_sequence_loss(logprobs, old_logprobs[mb], advantages[mb],
                                                                    mask[mb], c.clip)
                    else:
                        token_kl = kl_estimate(logprobs, ref_logprobs[mb], c.kl_estimator)
                        loss, clip_fraction = clipped_token_loss(logprobs, old_logprobs[mb], advantages[mb],
                                                                 mask[mb], c.clip, token_kl, kl_control.beta)
                    [norm] = run.update(optimizer, loss * share, [actor.parameters()])
                    stats["policy_loss"] += loss.item() * share
                    stats["clip_fraction"] += clip_fraction.item() * share
                    stats["grad_norm"] += norm / run.world
                    updates += 1
            kl_control.update(kl, len(batch) * k)
            totals = distributed.sum_values(list(stats.values()), run.device)
            values = {"reward": score.mean().item(), "kl": kl, "beta": kl_control.beta,
                      "response_length": mask.sum(1).mean().item(),
                      **{name: total / updates for name, total in zip(stats, totals)}}
            if run.rank == 0 and ((step + 1) % c.eval_every == 0 or step + 1 == c.max_steps):
                values.update(held_out(lm, reference, rm, heldout, sampling, c.seed + 1))
            run.end_step(step + 1, values, optimizer, modules,
                         {"beta": kl_control.beta, "reward_offset": rm.model.offset, "reward_scale": rm.model.scale})
        lm.model.eval()
        run.save(lm.write)
    return lm
