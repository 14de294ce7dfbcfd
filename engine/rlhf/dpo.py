"""`parley train dpo`: Direct Preference Optimization (Rafailov et al. 2023) on the user's rankings.

The policy starts as a copy of --policy, which stays frozen as the reference. Each step takes
whole prompts with all their pairs; a reply's log-probability is the sum over its tokens (its
content and end-of-turn marker) given the prompt. The result is saved as a normal model and
registered in the app.
"""
import copy
from itertools import islice

import torch
import torch.nn.functional as F

import engine
from engine import data
from engine.rlhf.losses import dpo_loss
from engine.rlhf.prefs import preference_groups, prompt_batches, right_pad, split_by_prompt
from engine.rlhf.run import Run
from engine.train import distributed


def sequence_logprobs(model, tokenizer, prompt: list[dict], replies: list[str], max_len: int) -> torch.Tensor:
    """Sum of log p of each reply's tokens after the prompt, for a list of replies to one prompt."""
    rows, masks = [], []
    for reply in replies:
        ids, mask = data.encode(tokenizer, prompt + [{"role": "assistant", "content": reply}], assistant_only=True)
        rows.append(ids[-max_len:])
        masks.append(mask[-max_len:])
    device = next(model.parameters()).device
    ids, pad_mask = right_pad(rows, 0, device)
    loss_mask = right_pad(masks, 0, device)[0].float()
    logits = model(ids[:, :-1], pad_mask=pad_mask[:, :-1]).float()
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None])[..., 0]
    return (logp * loss_mask[:, 1:]).sum(1)


def batch_terms(policy, reference, tokenizer, groups, beta: float, max_len: int):
    """(loss averaged over prompts, chosen rewards, rejected rewards) of whole prompts."""
    losses, chosen_rewards, rejected_rewards = [], [], []
    for g in groups:
        chosen, rejected = [c for c, _ in g["pairs"]], [r for _, r in g["pairs"]]
        pc = sequence_logprobs(policy, tokenizer, g["prompt"], chosen, max_len)
        pr = sequence_logprobs(policy, tokenizer, g["prompt"], rejected, max_len)
        with torch.no_grad():
            rc = sequence_logprobs(reference, tokenizer, g["prompt"], chosen, max_len)
            rr = sequence_logprobs(reference, tokenizer, g["prompt"], rejected, max_len)
        loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
        losses.append(loss)       # a prompt's pairs are averaged first: each prompt weighs the same
        chosen_rewards.append(cr)
        rejected_rewards.append(rj)
    return torch.stack(losses).mean(), torch.cat(chosen_rewards), torch.cat(rejected_rewards)


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
    train, heldout = split_by_prompt(preference_groups(prefs, store))
    model = lm.model.train()   # dropout-free models: train() changes nothing but intent
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = run.restore(optimizer, {"policy": model}).get("step", 0)
    batches = islice(prompt_batches(train, prompts_per_step, seed), start, max_steps)
    with run:
        for step, batch in enumerate(batches, start):
            mine = run.share(batch)
            loss, chosen, rejected = batch_terms(model, reference, lm.tokenizer, mine, beta, max_len)
            share = len(mine) / len(batch)
            run.update(optimizer, loss * share, model.parameters())
            totals = distributed.sum_values([loss.item() * share, (chosen > rejected).sum().item(),
                                             (chosen - rejected).sum().item(), len(chosen)], run.device)
            values = {"loss": totals[0], "reward_accuracy": totals[1] / totals[3], "margin": totals[2] / totals[3]}
            if run.rank == 0 and ((step + 1) % eval_every == 0 or step + 1 == max_steps):
                with torch.no_grad():
                    _, chosen, rejected = batch_terms(model, reference, lm.tokenizer, heldout, beta, max_len)
                values.update(eval_reward_accuracy=(chosen > rejected).float().mean().item(),
                              eval_margin=(chosen - rejected).mean().item())
                print(f"step {step + 1}/{max_steps}  loss {values['loss']:.4f}  held-out reward accuracy "
                      f"{values['eval_reward_accuracy']:.3f}  margin {values['eval_margin']:.4f}", flush=True)
            run.end_step(step + 1, max_steps, values, optimizer, {"policy": model})
        model.eval()
        run.save(lm.write)
    return lm
