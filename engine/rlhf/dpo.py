"""`parley train dpo`: Direct Preference Optimization (Rafailov et al. 2023) on the user's rankings.

The policy starts as a copy of --policy, which stays frozen as the reference. Each step takes
whole prompts with all their pairs; a reply's log-probability is the sum over its tokens (its
content and end-of-turn marker) given the prompt, never over earlier turns of the prompt. A
long prompt is cut from the left by the same amount for chosen and rejected; a pair whose reply
alone fills `max_len` is skipped and counted, never cut. The result is saved as a normal model and
registered in the app (with --lora-r: an adapter directory, engine/lora.py, whose reference is the
policy with its adapter off).
"""
from itertools import islice

import torch

from engine import lora
from engine.rlhf.losses import dpo_loss
from engine.rlhf.prefs import encoded_split, preference_groups, prompt_batches, reply_batch
from engine.train import distributed
from engine.train.config import DPOConfig
from engine.train.logprobs import token_logprobs
from engine.train.run import Run, frozen_copy, load_model


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


def train_dpo(c: DPOConfig, store=None):
    run = Run(c, c.policy, store, shown=("loss", "reward_accuracy", "margin", "eval_reward_accuracy", "eval_margin"))
    torch.manual_seed(c.seed)
    lm = load_model(c.policy, run.device, c)
    reference = frozen_copy(lm.model)   # with --lora-r, the policy with its adapter off
    train, heldout, run.config["skipped_pairs"] = encoded_split(lm.tokenizer, preference_groups(c.prefs, store),
                                                                c.max_len)
    pad_id = lm.tokenizer.pad_token_id or 0
    model = lm.model.train()   # dropout-free models: train() changes nothing but intent
    optimizer = torch.optim.AdamW(lora.trainable(model), lr=c.lr, weight_decay=0.0)
    start = run.restore(optimizer, {"policy": lora.checkpointed(model)}).get("step", 0)
    batches = islice(prompt_batches(train, c.prompts_per_step, c.seed), start, c.max_steps)
    trained = run.parallel(model)
    with run:
        for step, batch in enumerate(batches, start):
            mine = run.share(batch)
            loss, chosen, rejected = batch_terms(trained, reference, mine, c.beta, pad_id)
            share = len(mine) / len(batch)
            run.update(optimizer, loss * share, [model.parameters()])
            totals = distributed.sum_values([loss.item() * share, (chosen > rejected).sum().item(),
                                             (chosen - rejected).sum().item(), len(chosen)], run.device)
            values = {"loss": totals[0], "reward_accuracy": totals[1] / totals[3], "margin": totals[2] / totals[3]}
            if run.rank == 0 and ((step + 1) % c.eval_every == 0 or step + 1 == c.max_steps):
                with torch.no_grad():
                    _, chosen, rejected = batch_terms(model, reference, heldout, c.beta, pad_id)
                values.update(eval_reward_accuracy=(chosen > rejected).float().mean().item(),
                              eval_margin=(chosen - rejected).mean().item())
            run.end_step(step + 1, values, optimizer, {"policy": lora.checkpointed(model)})
        model.eval()
        run.save(lm.write)
    return lm
