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

from engine.errors import ParleyError
from engine.rlhf.logprobs import token_logprobs
from engine.rlhf.losses import clipped_sequence_loss, clipped_token_loss, grpo_advantages, kl_estimate, rloo_advantages
from engine.rlhf.ppo import AdaptiveKL, normalise_rewards, progress
from engine.rlhf.rollout import Sampling, held_out, load_online, load_prompts, online_batch, split_prompts
from engine.rlhf.run import Run
from engine.train import distributed

DEFAULT_ESTIMATOR = {"rloo": "k1", "grpo": "k3"}


def group_advantages(method: str, score, logprobs, ref_logprobs, mask, k: int, beta: float, estimator: str):
    """The advantage of each reply [B]: RLOO's on the KL-penalised reward, GRPO's on the score."""
    if method == "rloo":
        kl = (kl_estimate(logprobs, ref_logprobs, estimator) * mask).sum(1)
        return rloo_advantages(score - beta * kl, k)
    return grpo_advantages(score, k)


def train_group(method: str, policy: str, reward_model: str, out: str, prompts: str | None = None,
                max_steps: int = 50, prompts_per_step: int = 8, k: int = 4, epochs: int = 1,
                minibatch_prompts: int | None = None, lr: float = 1e-5, beta: float | None = None,
                target_kl: float | None = None, kl_estimator: str | None = None, temperature: float = 1.0,
                max_new_tokens: int = 32, missing_eos_penalty: float = 1.0, score_clip: float = 10.0,
                clip: float = 0.2, eval_every: int = 10, eval_prompts: int = 32, seed: int = 0, device=None,
                save_every: int = 10, resume: bool = False, store=None):
    if k < 2:
        raise ParleyError(f"--replies {k}: {method.upper()} needs at least 2 replies per prompt to compare")
    beta = (0.05 if method == "rloo" else 0.04) if beta is None else beta
    estimator = kl_estimator or DEFAULT_ESTIMATOR[method]
    if estimator not in ("k1", "k3"):
        raise ParleyError(f"--kl-estimator {estimator!r}: use k1 or k3")
    minibatch_prompts = minibatch_prompts or prompts_per_step
    config = {"policy": policy, "reward_model": reward_model, "max_steps": max_steps, "prompts_per_step":
              prompts_per_step, "k": k, "epochs": epochs, "lr": lr, "beta": beta, "target_kl": target_kl,
              "kl_estimator": estimator, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
    run = Run(method, config, policy, out, store, device, resume, save_every)
    torch.manual_seed(seed)
    lm, rm, reference = load_online(policy, reward_model, run.device)
    sampling = Sampling(temperature, max_new_tokens)
    train, heldout = split_prompts(load_prompts(prompts, store))
    heldout = heldout[:eval_prompts]
    actor = lm.model
    optimizer = torch.optim.AdamW(actor.parameters(), lr=lr, weight_decay=0.0)
    modules = {"actor": actor}
    state = run.restore(optimizer, modules)
    normalise_rewards(state, lm, rm, train, sampling, seed)
    kl_control = AdaptiveKL(state.get("beta", beta), target_kl)
    with run:
        for step in range(state.get("step", 0), max_steps):
            rng = random.Random(seed * 1_000_003 + step)   # every step a function of (seed, step): resumable
            batch = [rng.choice(train) for _ in range(prompts_per_step)]
            r, score, old_logprobs, ref_logprobs, kl = online_batch(
                lm, reference, rm, run, batch, k, sampling, seed * 100003 + step * 997, missing_eos_penalty, score_clip)
            ids, pad_mask, mask = r.ids, r.pad_mask, r.targets
            advantages = group_advantages(method, score, old_logprobs, ref_logprobs, mask, k, kl_control.beta,
                                          estimator)
            stats = dict.fromkeys(("policy_loss", "clip_fraction", "grad_norm"), 0.0)
            updates = 0
            for _ in range(epochs):
                order = torch.randperm(prompts_per_step, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
                for first in range(0, prompts_per_step, minibatch_prompts):
                    rows = [p * k + j for p in order[first:first + minibatch_prompts].tolist() for j in range(k)]
                    mb = torch.tensor(run.share(rows), device=lm.device)
                    share = len(mb) / len(rows)
                    logprobs = token_logprobs(actor, ids[mb], pad_mask[mb], mask[mb], temperature)
                    if method == "rloo":
                        loss, clip_fraction = clipped_sequence_loss(logprobs, old_logprobs[mb], advantages[mb],
                                                                    mask[mb], clip)
                    else:
                        token_kl = kl_estimate(logprobs, ref_logprobs[mb], estimator)
                        loss, clip_fraction = clipped_token_loss(logprobs, old_logprobs[mb], advantages[mb],
                                                                 mask[mb], clip, token_kl, kl_control.beta)
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
            if run.rank == 0 and ((step + 1) % eval_every == 0 or step + 1 == max_steps):
                values.update(held_out(lm, reference, rm, heldout, sampling, seed + 1))
            if run.rank == 0:
                print(progress(step + 1, max_steps, values), flush=True)
            run.end_step(step + 1, max_steps, values, optimizer, modules,
                         {"beta": kl_control.beta, "reward_offset": rm.model.offset, "reward_scale": rm.model.scale})
        lm.model.eval()
        run.save(lm.write)
    return lm
