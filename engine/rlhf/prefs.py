"""Preference data for RLHF: pairs grouped by prompt, split, padded and batched."""
import json
import random

import torch

from engine.data import split_by_prompt
from engine.errors import ParleyError


def preference_groups(source: str, store=None) -> list[dict]:
    """[{"prompt": messages, "pairs": [(chosen, rejected), ...]}], one per prompt.

    `source` is "store" (the user's rankings) or a TRL-format JSONL file, checked line by line."""
    if source == "store":
        if store is None:
            from engine.store import Store
            store = Store()
        # each group keeps the ids of the rankings its pairs come from: a reward model records the
        # ones it trained on, so that its agreement with the user is measured on the others
        groups = [{"prompt": g["prompt"], "pairs": [(p["chosen"], p["rejected"]) for p in g["pairs"]],
                   "rankings": sorted({p["ranking_id"] for p in g["pairs"]})} for g in store.pairs_by_prompt()]
    else:
        from engine.store.exchange import _check_pref, read_jsonl
        by_prompt: dict[str, dict] = {}
        for number, row, error in read_jsonl(source):
            error = error or _check_pref(row)
            if error:
                raise ParleyError(f"{source}:{number}: {error}")
            key = json.dumps(row["_prompt"], sort_keys=True)
            by_prompt.setdefault(key, {"prompt": row["_prompt"], "pairs": []})["pairs"].append(
                (row["_chosen"], row["_rejected"]))
        groups = list(by_prompt.values())
    if not groups:
        raise ParleyError(f"no preference pairs in {source}: rank some candidates in the app first")
    return groups


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the right into [batch, longest], and the mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return ids.to(device), mask.to(device)


def prompt_batches(groups: list[dict], per_step: int, seed: int):
    """Batches of `per_step` whole prompts (all their pairs together), read from seeded
    permutations one epoch after another, forever."""
    rng, order = random.Random(seed), []
    while True:
        batch = []
        while len(batch) < per_step:
            if not order:
                order = list(range(len(groups)))
                rng.shuffle(order)
            batch.append(groups[order.pop()])
        yield batch


# -- replies as tokens ----------------------------------------------------------------------------
def reply_ids(tokenizer, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): the prompt rendered through the assistant header, exactly as a
    policy is prompted to generate, and the reply (its content and the end-of-turn marker) after it.

    Like TRL, the two texts are tokenised apart, so a reply's tokens never depend on the prompt
    and earlier assistant turns of a multi-turn prompt are prompt, not reply."""
    prompt_text = tokenizer.render_chat(prompt, add_generation_prompt=True)
    full_text = tokenizer.render_chat(prompt + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ParleyError("the chat template renders a reply in a way that changes the prompt before it, so the reply "
                          "cannot be told apart: use a template that renders conversations incrementally (ChatML)")
    return tokenizer.encode(prompt_text, add_special_tokens=False), \
        tokenizer.encode(full_text[len(prompt_text):], add_special_tokens=False)


def fit_prompt(prompt: list[int], replies: list[list[int]], max_len: int) -> list[int] | None:
    """The end of the prompt that leaves room in `max_len` for the longest of `replies`; the same
    window for all of them, so chosen and rejected see one context. None when a reply leaves no
    room for a single prompt token (the caller skips and counts it: a reply is never cut)."""
    room = max_len - max(len(r) for r in replies)
    return prompt[-room:] if room >= 1 else None


def encode_pairs(tokenizer, groups: list[dict], max_len: int, split=reply_ids) -> tuple[list[dict], int]:
    """Groups with each pair as token ids (prompt window, chosen reply, rejected reply) that fit
    in `max_len`; and the number of pairs skipped because a reply alone is that long. `split`
    gives (prompt ids, reply ids) of one prompt and reply (reply_ids, or a BERT's plain text)."""
    encoded, skipped = [], 0
    for g in groups:
        pairs = []
        for chosen, rejected in g["pairs"]:
            prompt, c = split(tokenizer, g["prompt"], chosen)
            _, r = split(tokenizer, g["prompt"], rejected)
            window = fit_prompt(prompt, [c, r], max_len)
            if window is None:
                skipped += 1
            else:
                pairs.append((window, c, r))
        if pairs:
            encoded.append({**g, "pairs": pairs})
    return encoded, skipped


def reply_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, device):
    """(prompt, reply) rows as right-padded ids [B, T], the non-pad mask, and the mask of reply
    tokens as targets [B, T-1]: the position t predicts token t + 1."""
    ids, pad_mask = right_pad([p + r for p, r in rows], pad_id, device)
    targets = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=device)
    for i, (p, r) in enumerate(rows):
        targets[i, len(p) - 1:len(p) + len(r) - 1] = 1.0
    return ids, pad_mask, targets


def encoded_split(tokenizer, groups: list[dict], max_len: int, split=reply_ids):
    """(train, held-out) groups as token ids, and the number of pairs too long to fit, said once."""
    train, heldout = split_by_prompt(groups)
    train, skipped_train = encode_pairs(tokenizer, train, max_len, split)
    heldout, skipped_heldout = encode_pairs(tokenizer, heldout, max_len, split) if heldout is not train else (train, 0)
    skipped = skipped_train + skipped_heldout
    if skipped:
        print(f"skipped {skipped} preference pairs whose reply alone fills {max_len} tokens "
              "(raise --max-len to keep them)", flush=True)
    if not train or not heldout:
        raise ParleyError(f"every preference pair has a reply longer than {max_len} tokens: raise --max-len")
    return train, heldout, skipped
