"""Preference data for RLHF: pairs grouped by prompt, split, padded and batched."""
import json
import random

import torch

from engine import data
from engine.errors import ParleyError


def preference_groups(source: str, store=None) -> list[dict]:
    """[{"prompt": messages, "pairs": [(chosen, rejected), ...]}], one per prompt.

    `source` is "store" (the user's rankings) or a TRL-format JSONL file, checked line by line."""
    if source == "store":
        if store is None:
            from engine.store import Store
            store = Store()
        groups = [{"prompt": g["prompt"], "pairs": [(p["chosen"], p["rejected"]) for p in g["pairs"]]}
                  for g in store.pairs_by_prompt()]
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


def split_by_prompt(groups: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by the fixed split of data.held_out on the prompt; held-out is never empty."""
    def key(g):
        return json.dumps(g["prompt"], sort_keys=True)
    train = [g for g in groups if not data.held_out(key(g))]
    heldout = [g for g in groups if data.held_out(key(g))]
    return train or groups, heldout or train or groups


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
