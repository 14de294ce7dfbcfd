"""`parley train dpo`: Direct Preference Optimization (Rafailov et al. 2023) on the user's rankings.

The policy starts as a copy of --policy, which stays frozen as the reference. Each step takes
whole prompts with all their pairs; a reply's log-probability is the sum over its tokens (its
content and end-of-turn marker) given the prompt, never over earlier turns of the prompt. A
long prompt is cut from the left by the same amount for chosen and rejected; a pair whose reply
alone fills `max_len` is skipped and counted, never cut. The result is saved as a normal model and
registered in the app.
"""
import copy
from itertools import islice

import torch

import engine
from engine.rlhf.logprobs import token_logprobs
from engine.rlhf.losses import dpo_loss
from engine.rlhf.prefs import encoded_split, preference_groups, prompt_batches, reply_batch
from engine.rlhf.run import Run
from engine.train import distributed


def sequence_logprobs(model, rows: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Sum of log p of each reply's tokens given its prompt, for (prompt ids, reply ids) rows."""
    ids, pad_mask, targets = reply_batch(rows, pad_id, next(model.parameters()).device)
    return token_logprobs(model, ids, pad_mask, targets).sum(1)


def batch_terms(policy, reference, groups, beta: float, pad_id: int):
    """(loss averaged over prompts, chosen rewards, rejected rewards) of encoded whole prompts
    (prefs.encode_pairs); chosen and rejected replies of every prompt run as one batch."""
    pairs = [(pair, g) for g, group in enumerate(groups) for pair in group["pairs"]]
    rows = [(p, c) for (p, c, _), _ in pairs] + [(p, r) for (p, _, r), _ in pairs]
    group = torch.tensor([g for _, g in pairs])
    n = len(pairs)
    policy_logps = sequence_logprobs(policy, rows, pad_id)
    with torch.no_grad():
        ref_logps = sequence_logprobs(reference, rows, pad_id)
    return dpo_loss(policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:], beta,
                    group.to(policy_logps.device))


def train_dpo(policy: str, prefs: str, out: str, beta: float = 0.1, max_steps: int = 100, lr: float = 5e-5,
              prompts_per_step: int = 8, seed: int = 0, device=None, eval_every: int = 25, save_every: int = 50,
              resume: bool = False, max_len: int = 256, store=None):
    config = {"policy": policy, "prefs": prefs, "beta": beta, "max_steps": max_steps, "lr": lr, "seed": seed}
    run = Run("dpo", config, policy, out, store, device, resume, save_every)
    torch.manual_seed(seed)
    lm = engine.load(policy, device=run.device, dtype="float32")
    reference = copy.deepcopy(lm.model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    train, heldout, skipped = encoded_split(lm.tokenizer, preference_groups(prefs, store), max_len)
    config["skipped_pairs"] = skipped
    pad_id = lm.tokenizer.pad_token_id or 0
    model = lm.model.train()   # dropout-free models: train() changes nothing but intent
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = run.restore(optimizer, {"policy": model}).get("step", 0)
    batches = islice(prompt_batches(train, prompts_per_step, seed), start, max_steps)
    with run:
        for step, batch in enumerate(batches, start):
            mine = run.share(batch)
            loss, chosen, rejected = batch_terms(model, reference, mine, beta, pad_id)
            share = len(mine) / len(batch)
            run.update(optimizer, loss * share, [model.parameters()])
            totals = distributed.sum_values([loss.item() * share, (chosen > rejected).sum().item(),
                                             (chosen - rejected).sum().item(), len(chosen)], run.device)
            values = {"loss": totals[0], "reward_accuracy": totals[1] / totals[3], "margin": totals[2] / totals[3]}
            if run.rank == 0 and ((step + 1) % eval_every == 0 or step + 1 == max_steps):
                with torch.no_grad():
                    _, chosen, rejected = batch_terms(model, reference, heldout, beta, pad_id)
                values.update(eval_reward_accuracy=(chosen > rejected).float().mean().item(),
                              eval_margin=(chosen - rejected).mean().item())
                print(f"step {step + 1}/{max_steps}  loss {values['loss']:.4f}  held-out reward accuracy "
                      f"{values['eval_reward_accuracy']:.3f}  margin {values['eval_margin']:.4f}", flush=True)
            run.end_step(step + 1, max_steps, values, optimizer, {"policy": model})
        model.eval()
        run.save(lm.write)
    return lm
