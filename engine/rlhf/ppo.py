"""`parley train ppo`: PPO against a reward model (InstructGPT; "The N Implementation Details of
RLHF with PPO", Huang et al. 2022).

Four networks: the policy (trained), a frozen reference copy of it, the critic (initialised from
the reward model, trained) and the reward model (frozen). Each step:

1. rollout: sample one reply per prompt of the batch from the policy (temperature T);
2. score: the reward model's score, minus `missing_eos_penalty` for replies that never reach
   EOS, clipped to +-`score_clip`; per-token reward -beta (log pi - log pi_ref), plus the score at
   the last token. beta is fixed, or adapted towards `target_kl` (Ziegler et al. 2019);
3. GAE with gamma = 1, lambda = 0.95 on the critic's values; advantages whitened;
4. `ppo_epochs` passes over minibatches: the clipped surrogate (epsilon 0.2), the clipped value
   loss (x `vf_coef`), and optionally InstructGPT's PPO-ptx term: `ptx_coef` x the language-model
   loss on pretraining text. Log-probabilities always come from logits divided by T, as in the
   rollout. An EMA of the policy can be kept and saved instead.

Where the two sources differ we follow the N Implementation Details (per-token KL in the reward,
whitened advantages, value clipping), since they reproduce OpenAI's original code.
"""
import copy
import json
import random

import torch
import torch.nn.functional as F

import engine
from engine import data
from engine.errors import ParleyError
from engine.generate import generate
from engine.rlhf.losses import gae, masked_mean, ppo_policy_loss, ppo_value_loss, token_rewards, whiten
from engine.rlhf.prefs import right_pad
from engine.rlhf.reward_model import RewardModel, load_reward_model
from engine.rlhf.run import Run
from engine.sampling import Settings
from engine.train import distributed


def load_prompts(source: str | None, store=None) -> list[list[dict]]:
    """Prompts as message lists: from a JSONL file of {"prompt": messages or text}, or else from the
    store's conversations (each thread up to its last user message)."""
    prompts = []
    if source:
        from engine.store.exchange import read_jsonl
        for number, row, error in read_jsonl(source):
            prompt = row.get("prompt") if isinstance(row, dict) and not error else None
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            if error or not isinstance(prompt, list) or not prompt or not all(
                    isinstance(m, dict) and m.get("role") in data.ROLES and isinstance(m.get("content"), str)
                    for m in prompt):
                raise ParleyError(f"{source}:{number}: {error or 'needs prompt: a text or a list of messages'}")
            prompts.append(prompt)
    else:
        if store is None:
            raise ParleyError("without --prompts, prompts come from the store: chat in the app first")
        for c in store.conversations():
            thread = store.thread(c["id"])
            users = [i for i, m in enumerate(thread) if m["role"] == "user"]
            if users:
                prompts.append(store.prompt_messages(c["id"], thread[users[-1]]["id"]))
    if not prompts:
        raise ParleyError("no prompts to train on: give --prompts FILE.jsonl or chat in the app first")
    return prompts


class AdaptiveKL:
    """beta grows when the KL overshoots the target and shrinks when it undershoots."""

    def __init__(self, beta: float, target: float | None, horizon: int = 10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n / self.horizon


def response_logprobs(model, ids, pad_mask, response_mask, temperature: float):
    """log pi of every next token (at the position that predicts it), entropy, from logits / T."""
    logits = model(ids[:, :-1], pad_mask=pad_mask[:, :-1]).float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, 2, ids[:, 1:, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp * response_mask, entropy


def values_of(critic: RewardModel, ids, pad_mask, response_mask):
    """The critic's value of each state that predicts a response token (aligned with log-probs)."""
    hidden = critic.backbone.hidden_states(ids[:, :-1], pad_mask=pad_mask[:, :-1])
    return critic.score(hidden).squeeze(-1).float() * response_mask


def train_ppo(policy: str, reward_model: str, out: str, prompts: str | None = None, max_steps: int = 50,
              batch_size: int = 16, minibatch_size: int = 8, ppo_epochs: int = 4, lr: float = 1e-5,
              critic_lr: float | None = None, beta: float = 0.05, target_kl: float | None = None,
              temperature: float = 1.0, max_new_tokens: int = 32, missing_eos_penalty: float = 1.0,
              score_clip: float = 10.0, clip: float = 0.2, vf_coef: float = 0.1, ptx_coef: float = 0.0,
              ptx_data: str | None = None, ema: float | None = None, seed: int = 0, device=None,
              save_every: int = 10, resume: bool = False, store=None):
    config = {"policy": policy, "reward_model": reward_model, "max_steps": max_steps, "batch_size": batch_size,
              "lr": lr, "beta": beta, "target_kl": target_kl, "temperature": temperature, "seed": seed}
    run = Run("ppo", config, policy, out, store, device, resume, save_every)
    torch.manual_seed(seed)
    lm = engine.load(policy, device=run.device, dtype="float32")
    rm = load_reward_model(reward_model, device=lm.device)
    if rm.tokenizer.vocab_size != lm.tokenizer.vocab_size:
        raise ParleyError("the reward model and the policy use different tokenizers: train the reward model on the "
                          "policy (parley train rm --base POLICY)")
    for p in rm.model.parameters():
        p.requires_grad_(False)
    reference = copy.deepcopy(lm.model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    critic = copy.deepcopy(rm.model).train()
    for p in critic.parameters():
        p.requires_grad_(True)
    critic.offset = 0.0
    actor = lm.model.train()
    average = copy.deepcopy(actor).eval() if ema else None
    trained = list(actor.parameters()) + list(critic.parameters())
    optimizer = torch.optim.AdamW([{"params": actor.parameters(), "lr": lr},
                                   {"params": critic.parameters(), "lr": critic_lr or lr * 10}], weight_decay=0.0)
    all_prompts = load_prompts(prompts, store)
    train = [p for p in all_prompts if not data.held_out(json.dumps(p, sort_keys=True))] or all_prompts
    ptx = ptx_rows(lm, ptx_data) if ptx_coef else None
    modules = {"actor": actor, "critic": critic, **({"ema": average} if average is not None else {})}
    state = run.restore(optimizer, modules)
    kl_control = AdaptiveKL(state.get("beta", beta), target_kl)
    with run:
        for step in range(state.get("step", 0), max_steps):
            rng = random.Random(seed * 1_000_003 + step)   # every step a function of (seed, step): resumable
            batch = [rng.choice(train) for _ in range(batch_size)]
            # 1. rollout: each process samples its share, then every process holds the whole batch
            actor.eval()
            mine = []
            for i in run.share(list(range(batch_size))):
                ids = lm.tokenizer.encode_chat(batch[i])[-(lm.max_context - max_new_tokens - 1):]
                reply = generate(lm, ids, Settings(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0,
                                                   max_new_tokens=max_new_tokens, seed=seed * 100003 + step * 997 + i),
                                 top_alternatives=0)[0]
                mine.append((i, ids + reply.token_ids, len(ids), reply.finish_reason == "eos", reply.text))
            _, rows, prompt_lengths, ended, texts = zip(*sorted(distributed.gather(mine)))
            actor.train()
            ids, pad_mask, response_mask = pad_rows(rows, prompt_lengths, lm.tokenizer.pad_token_id or 0, lm.device)
            # 2. score and per-token rewards (every process computes the same, rather than send tensors)
            with torch.no_grad():
                # scored as text, exactly as the reward model was trained (prompt + reply + end of turn)
                score = torch.tensor(rm.rewards(list(zip(batch, texts))), device=lm.device)
                score = score - missing_eos_penalty * (~torch.tensor(ended, device=lm.device)).float()
                score = score.clamp(-score_clip, score_clip)
                old_logprobs, _ = response_logprobs(actor, ids, pad_mask, response_mask, temperature)
                ref_logprobs, _ = response_logprobs(reference, ids, pad_mask, response_mask, temperature)
                old_values = values_of(critic, ids, pad_mask, response_mask)
                rewards = token_rewards(score, old_logprobs, ref_logprobs, response_mask, kl_control.beta)
                advantages, returns = gae(rewards, old_values, response_mask, gamma=1.0, lam=0.95)
                advantages = whiten(advantages, response_mask) * response_mask
            kl = ((old_logprobs - ref_logprobs) * response_mask).sum(1).mean().item()
            # 4. PPO epochs over minibatches; a process's share of a minibatch weighs by its tokens
            stats = dict.fromkeys(("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy"), 0.0)
            updates = 0
            for _ in range(ppo_epochs):
                order = torch.randperm(batch_size, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
                for first in range(0, batch_size, minibatch_size):
                    minibatch = order[first:first + minibatch_size].tolist()
                    mb = torch.tensor(run.share(minibatch), device=lm.device)
                    share = (response_mask[mb].sum() / response_mask[minibatch].sum().clamp(min=1)).item()
                    logprobs, entropy = response_logprobs(actor, ids[mb], pad_mask[mb], response_mask[mb], temperature)
                    values = values_of(critic, ids[mb], pad_mask[mb], response_mask[mb])
                    pg_loss, clip_fraction, approx_kl = ppo_policy_loss(logprobs, old_logprobs[mb], advantages[mb],
                                                                        response_mask[mb], clip)
                    vf_loss, _ = ppo_value_loss(values, old_values[mb], returns[mb], response_mask[mb], clip)
                    loss = (pg_loss + vf_coef * vf_loss) * share
                    if ptx is not None:
                        x = ptx[rng.randrange(len(ptx))][None].to(lm.device)
                        if run.rank == 0:   # one pretraining row per minibatch, whatever the number of processes
                            loss = loss + ptx_coef * F.cross_entropy(actor(x[:, :-1]).float().flatten(0, 1), x[0, 1:])
                    run.update(optimizer, loss, trained)
                    if average is not None:
                        with torch.no_grad():
                            for a, p in zip(average.parameters(), actor.parameters()):
                                a.lerp_(p, 1 - ema)
                    for name, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("approx_kl", approx_kl),
                                        ("clip_fraction", clip_fraction),
                                        ("entropy", masked_mean(entropy, response_mask[mb]))):
                        stats[name] += value.item() * share
                    updates += 1
            kl_control.update(kl, batch_size)
            totals = distributed.sum_values(list(stats.values()), run.device)
            values = {"reward": score.mean().item(), "kl": kl, "beta": kl_control.beta,
                      "response_length": response_mask.sum(1).float().mean().item(),
                      **{name: total / updates for name, total in zip(stats, totals)}}
            if run.rank == 0:
                print(f"step {step + 1}/{max_steps}  reward {values['reward']:.3f}  kl {values['kl']:.3f}  "
                      f"entropy {values['entropy']:.3f}  clip {values['clip_fraction']:.2f}", flush=True)
            run.end_step(step + 1, max_steps, values, optimizer, modules, {"beta": kl_control.beta})
        if average is not None:
            lm.model = average
        lm.model.eval()
        run.save(lm.write)
    return lm


def pad_rows(rows, prompt_lengths, pad_id, device):
    """Right-padded ids, the non-pad mask, and the mask of response tokens as targets [B, T-1]."""
    ids, pad_mask = right_pad(rows, pad_id, device)
    response = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=device)
    for i, (r, n) in enumerate(zip(rows, prompt_lengths)):
        response[i, n - 1:len(r) - 1] = 1.0   # target positions n..len-1 are predicted at n-1..len-2
    return ids, pad_mask, response


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
    pairs = []
    for i, prompt in enumerate(prompts):
        reply = generate(lm, lm.tokenizer.encode_chat(prompt), Settings(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                                                        seed=seed + i, max_new_tokens=max_new_tokens),
                         top_alternatives=0)[0]
        pairs.append((prompt, reply.text))
    return sum(rm.rewards(pairs)) / len(pairs)
