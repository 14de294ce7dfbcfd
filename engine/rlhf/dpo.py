"""`parley train dpo`: Direct Preference Optimization (Rafailov et al. 2023) on the user's rankings.

The policy starts as a copy of --policy, which stays frozen as the reference. Each step takes
whole prompts with all their pairs; a reply's log-probability is the sum over its tokens (its
content and end-of-turn marker) given the prompt. The result is saved as a normal model and
registered in the app.
"""
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

import engine
from engine import data
from engine.rlhf.losses import dpo_loss
from engine.rlhf.prefs import preference_groups, prompt_batches, recorded_run, right_pad, split_by_prompt


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
    cr, rj = torch.cat(chosen_rewards), torch.cat(rejected_rewards)
    return torch.stack(losses).mean(), (cr > rj).float().mean(), (cr - rj).mean()


def train_dpo(policy: str, prefs: str, out: str, beta: float = 0.1, max_steps: int = 100, lr: float = 5e-5,
              prompts_per_step: int = 8, seed: int = 0, device=None, eval_every: int = 25, max_len: int = 256,
              store=None):
    torch.manual_seed(seed)
    lm = engine.load(policy, device=device, dtype="float32")
    reference = copy.deepcopy(lm.model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    train, heldout = split_by_prompt(preference_groups(prefs, store))
    model = lm.model.train()   # dropout-free models: train() changes nothing but intent
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    config = {"policy": policy, "prefs": prefs, "beta": beta, "max_steps": max_steps, "lr": lr, "seed": seed}
    with recorded_run(store, "dpo", config, policy) as run:
        for step, batch in zip(range(max_steps), prompt_batches(train, prompts_per_step, seed)):
            loss, accuracy, margin = batch_terms(model, reference, lm.tokenizer, batch, beta, max_len)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            values = {"loss": loss.item(), "reward_accuracy": accuracy.item(), "margin": margin.item()}
            if (step + 1) % eval_every == 0 or step + 1 == max_steps:
                with torch.no_grad():
                    _, eval_accuracy, eval_margin = batch_terms(model, reference, lm.tokenizer, heldout, beta, max_len)
                values.update(eval_reward_accuracy=eval_accuracy.item(), eval_margin=eval_margin.item())
                print(f"step {step + 1}/{max_steps}  loss {values['loss']:.4f}  held-out reward accuracy "
                      f"{values['eval_reward_accuracy']:.3f}  margin {values['eval_margin']:.4f}", flush=True)
            run.log(step + 1, values)
        model.eval()
        lm.save(out)
        run.output = str(out)
        if store is not None:
            from engine.train.trainer import register
            register(store, Path(out))
    return lm
