"""`parley train ppo`: PPO against a reward model (InstructGPT; "The N Implementation Details of
RLHF with PPO", Huang et al. 2022).

Four networks: the policy (trained), a frozen reference copy of it, the critic (a copy of the
reward model, trained) and the reward model (frozen). Each step:

1. rollout: one reply per prompt of the batch from the policy at temperature T, all prompts in
   one batched generation (engine.rlhf.rollout);
2. score: the reward model's normalised score (0 on average for the starting policy's samples at
   these settings, re-measured here if the reward model was normalised at other ones), minus
   `missing_eos_penalty` for replies that never reach EOS, clipped to +-`score_clip`; per-token
   reward -beta (log pi - log pi_ref) plus the score at the last token. beta is fixed, or adapted
   towards `target_kl` (Ziegler et al. 2019);
3. GAE (gamma, lambda) on the critic's values, advantages whitened. The critic keeps the reward
   model's normalisation, so its first values are on the scale of the rewards it predicts;
4. `ppo_epochs` passes over minibatches: the clipped surrogate (epsilon 0.2), the clipped value
   loss (x `vf_coef`), and optionally InstructGPT's PPO-ptx term: `ptx_coef` x the language-model
   loss on `ptx_batch` pretraining rows per update. Actor and critic gradients are clipped
   separately. Log-probabilities always come from logits divided by T, as in the rollout. The
   learning rate is constant or decays linearly to 0; an EMA of the policy can be kept and saved.

Every `eval_every` steps the held-out reward, KL, reply length and reference perplexity of fresh
samples are logged (engine.rlhf.rollout.held_out). Where the sources differ we follow the N
Implementation Details (per-token KL in the reward, whitened advantages, value clipping), since
they reproduce OpenAI's original code.
"""
import copy
import random

import torch

from engine import data, lora
from engine.errors import ParleyError
from engine.rlhf.losses import masked_mean, ppo_advantages, ppo_policy_loss, ppo_value_loss
from engine.rlhf.prefs import right_pad
from engine.rlhf.reward_model import RewardModel
from engine.rlhf.rollout import (
    Sampling,
    held_out,
    online_batch,
    reward_normaliser,
    rollout,
    scores,
    start_online,
)
from engine.train import distributed
from engine.train.config import PPOConfig
from engine.train.logprobs import summed_loss, token_logprobs
from engine.train.run import Run


class AdaptiveKL:
    """beta grows when the KL overshoots the target and shrinks when it undershoots (Ziegler et
    al. 2019, as TRL's AdaptiveKLController): beta x (1 + clip(KL / target - 1, +-0.2) x n / horizon)."""

    def __init__(self, beta: float, target: float | None, horizon: int = 10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n / self.horizon


def values_of(critic: RewardModel, ids, pad_mask, targets):
    """The critic's value of each state that predicts a response token (aligned with log-probs),
    normalised as the reward model's scores are. `critic` may be wrapped for torchrun (DDP)."""
    return critic(ids[:, :-1], pad_mask[:, :-1], every_position=True) * targets


def ema_update(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """average <- decay x average + (1 - decay) x model, parameter by parameter."""
    with torch.no_grad():
        for a, p in zip(average.parameters(), model.parameters()):
            a.lerp_(p, 1 - decay)


# what the progress display shows of each step (engine.train.progress), for every online method
SHOWN = ("reward", "kl", "response_length", "entropy", "clip_fraction", "heldout_reward", "heldout_kl", "heldout_length",
         "heldout_ref_ppl")


def linear_decay(step: int, max_steps: int) -> float:
    """The learning rate's factor at a step: 1 at the first step, falling linearly towards 0."""
    return 1 - step / max_steps


def train_ppo(c: PPOConfig, store=None):
    if c.lr_schedule not in ("constant", "linear"):
        raise ParleyError(f"--lr-schedule {c.lr_schedule!r}: use constant or linear")
    run = Run(c, c.policy, store, shown=SHOWN)
    torch.manual_seed(c.seed)
    lm, rm, reference, sampling, train, heldout = start_online(c, run, store)
    actor = lm.model
    ptx = ptx_rows(lm, c.data) if c.ptx_coef else None
    critic = copy.deepcopy(rm.model).train()
    for p in critic.parameters():
        p.requires_grad_(True)
    average = copy.deepcopy(actor).eval() if c.ema else None
    optimizer = torch.optim.AdamW([{"params": lora.trainable(actor), "lr": c.lr},
                                   {"params": critic.parameters(), "lr": c.critic_lr or c.lr * 10}], weight_decay=0.0)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    modules = {"actor": lora.checkpointed(actor), "critic": critic,
               **({"ema": lora.checkpointed(average)} if average is not None else {})}
    state = run.restore(optimizer, modules)
    normalise_rewards(state, lm, rm, train, sampling, c.seed)
    critic.offset, critic.scale = rm.model.offset, rm.model.scale
    kl_control = AdaptiveKL(state.get("beta", c.beta), c.target_kl)
    trained_actor, trained_critic = run.parallel(actor), run.parallel(critic)
    with run:
        for step in range(run.start, c.max_steps):
            rng = random.Random(c.seed * 1_000_003 + step)   # every step a function of (seed, step): resumable
            batch = [rng.choice(train) for _ in range(c.batch_size)]
            if c.lr_schedule == "linear":
                for group, base_lr in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base_lr * linear_decay(step, c.max_steps)
            # 1.-2. rollout and scores
            r, score, old_logprobs, ref_logprobs, kl = online_batch(
                lm, reference, rm, run, batch, 1, sampling, c.seed * 100003 + step * 997, c.missing_eos_penalty,
                c.score_clip)
            ids, pad_mask, mask = r.ids, r.pad_mask, r.targets
            # 3. values and advantages
            with torch.no_grad():
                old_values = values_of(critic, ids, pad_mask, mask)
                advantages, returns = ppo_advantages(score, old_logprobs, ref_logprobs, old_values, mask,
                                                     kl_control.beta, c.gamma, c.lam)
            # 4. PPO epochs over minibatches; a process's share of a minibatch weighs by its tokens
            stats = dict.fromkeys(("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl",
                                   "entropy", "actor_grad_norm", "critic_grad_norm", "ptx_loss"), 0.0)
            updates = 0
            for _ in range(c.ppo_epochs):
                order = torch.randperm(c.batch_size, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
                for first in range(0, c.batch_size, c.minibatch_size):
                    minibatch = order[first:first + c.minibatch_size].tolist()
                    mb = torch.tensor(run.share(minibatch), device=lm.device)
                    share = (mask[mb].sum() / mask[minibatch].sum().clamp(min=1)).item()
                    logprobs, entropy = token_logprobs(trained_actor, ids[mb], pad_mask[mb], mask[mb], c.temperature,
                                                       entropy=True)
                    values = values_of(trained_critic, ids[mb], pad_mask[mb], mask[mb])
                    pg_loss, clip_fraction, approx_kl = ppo_policy_loss(logprobs, old_logprobs[mb], advantages[mb],
                                                                        mask[mb], c.clip)
                    vf_loss, vf_clip_fraction = ppo_value_loss(values, old_values[mb], returns[mb], mask[mb], c.clip)
                    loss = (pg_loss + c.vf_coef * vf_loss) * share
                    ptx_loss = torch.zeros(())
                    if ptx is not None:
                        rows = [ptx[rng.randrange(len(ptx))] for _ in range(c.ptx_batch)]   # drawn on every process
                        if run.rank == 0:   # added once, whatever the number of processes
                            # through the unwrapped actor: its gradient joins the one DDP averages, whose
                            # hooks fire once per parameter for the summed gradient
                            ptx_loss = lm_loss(actor, rows, lm.device)
                            loss = loss + c.ptx_coef * ptx_loss
                    norms = run.update(optimizer, loss, [actor.parameters(), critic.parameters()])
                    if average is not None:
                        ema_update(average, actor, c.ema)
                    for name, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("approx_kl", approx_kl),
                                        ("clip_fraction", clip_fraction), ("value_clip_fraction", vf_clip_fraction),
                                        ("entropy", masked_mean(entropy, mask[mb]))):
                        stats[name] += value.item() * share
                    stats["actor_grad_norm"] += norms[0] / run.world
                    stats["critic_grad_norm"] += norms[1] / run.world
                    stats["ptx_loss"] += ptx_loss.item()
                    updates += 1
            kl_control.update(kl, c.batch_size)
            totals = distributed.sum_values(list(stats.values()), run.device)
            values = {"reward": score.mean().item(), "kl": kl, "beta": kl_control.beta,
                      "response_length": mask.sum(1).mean().item(), "lr": optimizer.param_groups[0]["lr"],
                      **{name: total / updates for name, total in zip(stats, totals)}}
            if ptx is None:
                del values["ptx_loss"]
            if run.rank == 0 and ((step + 1) % c.eval_every == 0 or step + 1 == c.max_steps):
                values.update(held_out(lm, reference, rm, heldout, sampling, c.seed + 1))
            run.end_step(step + 1, values, optimizer, modules,
                         {"beta": kl_control.beta, "reward_offset": rm.model.offset, "reward_scale": rm.model.scale})
        if average is not None:
            lm.model = average
        lm.model.eval()
        run.save(lm.write)
    return lm


def normalise_rewards(state: dict, lm, rm, prompts, sampling: Sampling, seed: int) -> None:
    """Give the reward model the (offset, scale) of these rollouts: a resumed run's, else the
    stored ones when they were measured at these settings, else measured now on the starting
    policy (which the reference stays); kept in `state` for the checkpoints."""
    if "reward_offset" not in state:
        if rm.config.get("parley_reward_normalised_at") == sampling.to_dict():
            offset, scale = rm.model.offset, rm.model.scale
        else:
            offset, scale = reward_normaliser(lm, rm, prompts[:64], sampling, seed, rm.model.scale != 1.0)
            print(f"the reward model was normalised at other rollout settings: offset {offset:.4f} and scale "
                  f"{scale:.4f} measured on the starting policy's samples", flush=True)
        state["reward_offset"], state["reward_scale"] = offset, scale
    rm.model.offset, rm.model.scale = state["reward_offset"], state["reward_scale"]


def lm_loss(model, rows: list[torch.Tensor], device) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of a few pretraining rows."""
    ids, pad_mask = right_pad([r.tolist() for r in rows], 0, device)
    targets = pad_mask[:, 1:].float()
    return summed_loss(model, ids, targets, pad_mask) / targets.sum()


def ptx_rows(lm, source: str | None) -> list[torch.Tensor]:
    """Pretraining sequences for PPO-ptx, from the same corpora the trainer reads."""
    train, _ = data.load(source)
    rows = []
    for example in train[:2000]:
        ids, _ = data.encode(lm.tokenizer, example)
        if len(ids) > 2:
            rows.append(torch.tensor(ids[:lm.max_context]))
    if not rows:
        raise ParleyError(f"{source}: no pretraining text for the ptx term")
    return rows


def mean_reward(lm, rm, prompts: list[list[dict]], seed: int, max_new_tokens: int = 32) -> float:
    """The mean reward of fresh samples (temperature 1) for `prompts`: how PPO is judged."""
    return scores(rm, rollout(lm, prompts, 1, Sampling(1.0, max_new_tokens), rm.max_len, seed)).mean().item()
