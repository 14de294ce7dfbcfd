"""What the online trainers (PPO, RLOO, GRPO) share: prompts, batched rollouts, their scores
and the held-out measures every method logs.

One context length runs end to end: the reward model's training length `context`. A policy is
prompted with the last tokens of a prompt that leave room for `max_new_tokens` and the
template's end of turn; the reward model reads that same prompt window and the reply as text,
rendered exactly as in its training rows.
"""
import math
from dataclasses import dataclass

import torch

from engine import data
from engine.errors import ParleyError
from engine.generate import generate_batch
from engine.train.logprobs import token_logprobs
from engine.rlhf.prefs import reply_batch, reply_ids, split_by_prompt
from engine.settings import Settings
from engine.train import distributed


def start_online(c, run, store) -> tuple:
    """What PPO, RLOO and GRPO start from, for their config `c` (engine.train.config.OnlineConfig):
    (policy LM, frozen reward model, frozen reference copy of the policy, rollout sampling,
    training prompts, held-out prompts)."""
    from engine.quantize import check
    from engine.rlhf.reward_model import is_bert, load_reward_model
    from engine.train.run import frozen_copy, load_model
    check(c.rollout_quantize, run.device, "--rollout-quantize")
    lm = load_model(c.policy, run.device, c)   # with --lora-r, an adapter on it (engine/lora.py)
    rm = load_reward_model(c.reward_model, device=lm.device)
    if is_bert(rm.config):
        raise ParleyError(f"{c.reward_model} is a BERT reward model, which reads plain text in a tokenizer of its own: "
                          "PPO, RLOO and GRPO score with one on the policy (parley train rm --base POLICY)")
    if rm.tokenizer.vocab_size != lm.tokenizer.vocab_size:
        raise ParleyError("the reward model and the policy use different tokenizers: train the reward model on the "
                          "policy (parley train rm --base POLICY)")
    for p in rm.model.parameters():
        p.requires_grad_(False)
    train, heldout = split_prompts(load_prompts(c.prompts, store))
    sampling = Sampling(c.temperature, c.max_new_tokens, c.rollout_quantize)
    return lm, rm, frozen_copy(lm.model), sampling, train, heldout[:c.eval_prompts]


@dataclass(frozen=True)
class Sampling:
    """How rollouts are drawn: from the policy's own distribution at `temperature`, nothing cut
    (top-k, top-p and min-p off), so that log-probabilities recomputed from logits / T are the
    probabilities the tokens were drawn with.

    `quantize` ("int8"): the replies are drawn from an int8 copy of the policy made afresh at each
    rollout (engine/quantize.py decoding_copy), which decodes faster on the CPU. Their
    log-probabilities still come from the float policy, so sampling is a little off-policy (the
    int8 rounding; the ratio and KL are computed as without it)."""
    temperature: float = 1.0
    max_new_tokens: int = 32
    quantize: str | None = None

    def settings(self, seed: int) -> Settings:
        return Settings(temperature=self.temperature, top_k=0, top_p=1.0, min_p=0.0,
                        max_new_tokens=self.max_new_tokens, seed=seed)

    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "max_new_tokens": self.max_new_tokens} \
            | ({"quantize": self.quantize} if self.quantize else {})


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


def split_prompts(prompts: list[list[dict]]) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, held-out) prompts, split as the preference data is (prefs.split_by_prompt)."""
    return split_by_prompt(prompts, prompt_of=lambda p: p)


@dataclass
class Rollout:
    """Sampled replies, row r being reply r % k of prompt r // k, and everything scored on them."""
    prompts: list[list[dict]]   # each row's prompt messages
    windows: list[list[int]]    # each row's prompt tokens, as the policy saw them
    texts: list[str]
    ids: torch.Tensor           # [B, T] prompt window + reply tokens, right-padded
    pad_mask: torch.Tensor      # [B, T]
    targets: torch.Tensor       # [B, T-1] 1 where position t predicts a reply token
    ended: torch.Tensor         # [B] the reply reached EOS


def prompt_window(tokenizer, prompt: list[dict], context: int, max_new_tokens: int) -> list[int]:
    """The prompt's last tokens that leave room in `context` for a reply and its end of turn."""
    end_of_turn = len(reply_ids(tokenizer, prompt, "")[1])
    room = context - max_new_tokens - end_of_turn
    if room < 1:
        raise ParleyError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the reward model's "
                          f"{context} tokens: lower it, or train the reward model with a larger --max-len")
    return tokenizer.encode_chat(prompt)[-room:]


def sample(lm, prompts: list[list[dict]], k: int, sampling: Sampling, context: int, seed: int,
           indices: list[int] | None = None) -> list[tuple]:
    """(prompt index, reply index, prompt window, reply token ids, text, reached EOS) of k replies
    to each of `prompts` (or only those at `indices`: a process's share), all in one batched
    generation (engine.generate). Reply j of prompt i is drawn with seed `seed + i * k + j`, so a
    rollout depends on nothing else: not on the batch, nor on how processes share it."""
    indices = list(range(len(prompts))) if indices is None else list(indices)
    context = min(context, lm.max_context)
    windows = [prompt_window(lm.tokenizer, prompts[i], context, sampling.max_new_tokens) for i in indices]
    if sampling.quantize:
        from engine.quantize import decoding_copy
        lm = decoding_copy(lm, sampling.quantize)
    results = generate_batch(lm, windows, [[sampling.settings(seed + i * k + j) for j in range(k)] for i in indices],
                             top_alternatives=0)
    return [(i, j, window, reply.token_ids, reply.text, reply.finish_reason == "eos")
            for i, window, replies in zip(indices, windows, results) for j, reply in enumerate(replies)]


def assemble(lm, prompts: list[list[dict]], samples: list[tuple]) -> Rollout:
    """A Rollout of samples (from `sample`, possibly gathered from every process), in order."""
    samples = sorted(samples, key=lambda s: s[:2])
    rows = [(window, reply) for _, _, window, reply, _, _ in samples]
    ids, pad_mask, targets = reply_batch(rows, lm.tokenizer.pad_token_id or 0, lm.device)
    return Rollout([prompts[s[0]] for s in samples], [s[2] for s in samples], [s[4] for s in samples], ids, pad_mask,
                   targets, torch.tensor([s[5] for s in samples], device=lm.device))


def rollout(lm, prompts: list[list[dict]], k: int, sampling: Sampling, context: int, seed: int) -> Rollout:
    """k replies to each prompt (see `sample`), row r being reply r % k of prompt r // k."""
    return assemble(lm, prompts, sample(lm, prompts, k, sampling, context, seed))


def online_batch(lm, reference, rm, run, prompts: list[list[dict]], k: int, sampling: Sampling, seed: int,
                 missing_eos_penalty: float, score_clip: float):
    """What every step of an online trainer starts with: k replies to each prompt (each process
    samples its share, then every process holds the whole batch), their scores, and the policy's
    and the reference's log-probabilities of them (every process computes the same, rather than
    send tensors). Returns (rollout, score, logprobs, ref_logprobs, KL per reply averaged)."""
    lm.model.eval()
    mine = sample(lm, prompts, k, sampling, rm.max_len, seed, indices=run.share(list(range(len(prompts)))))
    r = assemble(lm, prompts, distributed.gather(mine))
    lm.model.train()
    with torch.no_grad():
        score = scores(rm, r, missing_eos_penalty, score_clip)
        logprobs = token_logprobs(lm.model, r.ids, r.pad_mask, r.targets, sampling.temperature)
        ref_logprobs = token_logprobs(reference, r.ids, r.pad_mask, r.targets, sampling.temperature)
    kl = ((logprobs - ref_logprobs) * r.targets).sum(1).mean().item()
    return r, score, logprobs, ref_logprobs, kl


def scores(rm, rollout: Rollout, missing_eos_penalty: float = 0.0, clip: float | None = None) -> torch.Tensor:
    """The reward model's score of each reply, read on the prompt window the policy saw and the
    reply as text; minus `missing_eos_penalty` for replies that never reached EOS; clipped."""
    rows = [rm.fit(window, reply_ids(rm.tokenizer, prompt, text)[1])
            for prompt, window, text in zip(rollout.prompts, rollout.windows, rollout.texts)]
    score = rm.score_rows(rows).to(rollout.ids.device) - missing_eos_penalty * (~rollout.ended).float()
    return score.clamp(-clip, clip) if clip else score


def reward_normaliser(policy, rm, prompts: list[list[dict]], sampling: Sampling, seed: int,
                      scale: bool) -> tuple[float, float]:
    """(offset, scale) that give the policy's own samples, at the rollout settings, rewards of
    mean 0 (and, with `scale`, standard deviation 1) under `rm`."""
    offset, old_scale = rm.model.offset, rm.model.scale
    rm.model.offset, rm.model.scale = 0.0, 1.0
    try:
        raw = scores(rm, rollout(policy, prompts, 1, sampling, rm.max_len, seed))
    finally:
        rm.model.offset, rm.model.scale = offset, old_scale
    std = raw.std().item() if len(raw) > 1 else 1.0
    return raw.mean().item(), (std if scale and std > 1e-6 else 1.0)


def held_out(policy, reference, rm, prompts: list[list[dict]], sampling: Sampling, seed: int) -> dict:
    """How a policy does on prompts it never trains on, one fresh sample each (the same seeds at
    every evaluation): mean reward, mean reply length in words, the KL to the reference (the mean
    of log pi - log pi_ref summed over a reply's tokens) and the reference model's perplexity per
    token of the replies (fluency: collapsed or garbled text scores high)."""
    was_training = policy.model.training
    policy.model.eval()
    with torch.no_grad():
        r = rollout(policy, prompts, 1, sampling, rm.max_len, seed)
        reward = scores(rm, r)
        logp = token_logprobs(policy.model, r.ids, r.pad_mask, r.targets, sampling.temperature)
        ref = token_logprobs(reference, r.ids, r.pad_mask, r.targets, sampling.temperature)
        ref_plain = ref if sampling.temperature == 1.0 else token_logprobs(reference, r.ids, r.pad_mask, r.targets)
    policy.model.train(was_training)
    words = [len(t.split()) for t in r.texts]
    return {"heldout_reward": reward.mean().item(), "heldout_length": sum(words) / len(words),
            "heldout_kl": (logp - ref).sum(1).mean().item(),
            "heldout_ref_ppl": math.exp(-ref_plain.sum().item() / max(r.targets.sum().item(), 1))}
