"""`parley train rm` and `parley score`: a reward model from the user's rankings.

Any engine decoder is the backbone; a scalar head reads the final hidden state at the last
non-pad token of prompt + response (the pad id differs from EOS, so EOS is read, not skipped).
Each training batch holds whole prompts with all their pairs (InstructGPT), and the loss is
-1/C(K,2) sum log sigmoid(r(x, y_w) - r(x, y_l)) per prompt. After training, the rewards are
shifted so that replies sampled from the base (SFT) policy score 0 on average.

The directory is saved in transformers' ...ForSequenceClassification layout (the backbone's
tensors, minus lm_head, plus `score.weight`), with Parley's offset in config.json.
"""
import math
from itertools import islice
from pathlib import Path

import torch
import torch.nn as nn

import engine
from engine import checkpoint
from engine.device import pick_device
from engine.errors import ParleyError
from engine.files import atomic_dir, write_json
from engine.models import family
from engine.rlhf.losses import reward_model_loss
from engine.rlhf.prefs import preference_groups, prompt_batches, right_pad, split_by_prompt
from engine.rlhf.run import Run
from engine.tokenizer import Tokenizer
from engine.train import distributed

CLASSIFIERS = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
               "mistral": "MistralForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, offset: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.lm_head.weight.shape[1], 1, bias=False)
        self.offset = offset

    def forward(self, idx: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """One reward per right-padded row of token ids."""
        hidden = self.backbone.hidden_states(idx, pad_mask=pad_mask)
        last = pad_mask.long().cumsum(1).argmax(1)    # the last non-pad position
        return self.score(hidden[torch.arange(len(idx), device=idx.device), last]).squeeze(-1).float() - self.offset


class RewardLM:
    """A reward model with its tokenizer and config; `rewards` scores (prompt, response) pairs."""

    def __init__(self, model: RewardModel, tokenizer: Tokenizer, config: dict):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None or self.pad_id in (config.get("eos_token_id"), tokenizer.eos_token_id):
            raise ParleyError("a reward model needs a pad token distinct from EOS: add pad_token to "
                              "tokenizer_config.json")

    @property
    def device(self):
        return self.model.score.weight.device

    def encode(self, prompt: list[dict], response: str, max_len: int) -> list[int]:
        ids = self.tokenizer.encode_chat(prompt + [{"role": "assistant", "content": response}],
                                         add_generation_prompt=False)
        return ids[-max_len:]   # a long context loses its oldest tokens, never the response's end

    def batch(self, rows: list[list[int]]):
        return right_pad(rows, self.pad_id, self.device)

    def rewards(self, pairs: list[tuple[list[dict], str]], max_len: int = 512, batch_size: int = 16) -> list[float]:
        out = []
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                rows = [self.encode(p, r, max_len) for p, r in pairs[start:start + batch_size]]
                out += self.model(*self.batch(rows)).tolist()
        return out

    def save(self, path: str | Path) -> None:
        with atomic_dir(path) as tmp:
            self.write(tmp)

    def write(self, directory: Path) -> None:
        fam = family(self.config["model_type"])
        backbone = self.model.backbone
        state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("lm_head")}
        tensors = {**fam.state_to_hf(state), "score.weight": self.model.score.weight}
        config = {**self.config, "architectures": [CLASSIFIERS[self.config["model_type"]]], "num_labels": 1,
                  "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": self.pad_id,
                  "parley_reward_offset": self.model.offset}
        checkpoint.write_tensors(directory, tensors)
        write_json(directory / "config.json", config)
        self.tokenizer.save(directory)


def load_reward_model(path: str | Path, device=None) -> RewardLM:
    path = Path(path)
    checkpoint.check_model_dir(path)
    config = checkpoint.read_json(path / "config.json")
    if not str((config.get("architectures") or [""])[0]).endswith("ForSequenceClassification"):
        raise ParleyError(f"{path} is not a reward model (its architectures is {config.get('architectures')}): "
                          "train one with `parley train rm`")
    fam = family(config.get("model_type"))
    device = pick_device(device)
    with torch.device("meta"):
        backbone = fam.Model(fam.Config.from_hf(config))
    tensors = checkpoint.read_tensors(path, device, torch.float32)
    score = tensors.pop("score.weight", None)
    if score is None:
        raise ParleyError(f"{path}: tensor 'score.weight' is missing: the reward head was not saved")
    state = fam.state_from_hf(tensors)
    expected = {k: v.shape for k, v in backbone.state_dict().items() if not k.startswith("lm_head")}
    checkpoint.check_tensors(checkpoint.weight_files(path)[0], expected, state)
    backbone.load_state_dict(state, strict=False, assign=True)
    backbone.lm_head.weight = backbone.model.embed_tokens.weight if hasattr(backbone, "model") \
        else backbone.transformer.wte.weight   # unused by a reward model; keeps the module whole
    backbone.to(device)
    model = RewardModel(backbone, config.get("parley_reward_offset", 0.0)).to(device)
    model.score.weight = nn.Parameter(score)
    return RewardLM(model.eval(), Tokenizer.from_dir(path), config)


# -- training ----------------------------------------------------------------------------------------
def train_reward_model(base: str, prefs: str, out: str, max_steps: int = 200, lr: float = 5e-4,
                       prompts_per_step: int = 8, seed: int = 0, device=None, eval_every: int = 50,
                       save_every: int = 50, resume: bool = False, max_len: int = 256, normalise_samples: int = 32,
                       store=None) -> RewardLM:
    config = {"base": base, "prefs": prefs, "max_steps": max_steps, "lr": lr, "seed": seed}
    run = Run("rm", config, base, out, store, device, resume, save_every)
    torch.manual_seed(seed)
    lm = engine.load(base, device=run.device, dtype="float32")
    train, heldout = split_by_prompt(preference_groups(prefs, store))
    model = RewardModel(lm.model).to(lm.device)
    nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.score.in_features + 1))
    model.train()
    rm = RewardLM(model, lm.tokenizer, dict(lm.config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = run.restore(optimizer, {"reward_model": model}).get("step", 0)
    batches = islice(prompt_batches(train, prompts_per_step, seed), start, max_steps)
    with run:
        for step, batch in enumerate(batches, start):
            mine = run.share(batch)
            loss, accuracy, margin = pair_loss(rm, mine, max_len)
            share = len(mine) / len(batch)    # each prompt weighs the same, whichever process has it
            run.update(optimizer, loss * share, model.parameters())
            pairs = sum(len(g["pairs"]) for g in mine)
            totals = distributed.sum_values([loss.item() * share, accuracy.item() * pairs, margin.item() * pairs,
                                             pairs], run.device)
            values = {"loss": totals[0], "accuracy": totals[1] / totals[3], "margin": totals[2] / totals[3]}
            if run.rank == 0 and ((step + 1) % eval_every == 0 or step + 1 == max_steps):
                model.eval()
                with torch.no_grad():
                    _, eval_accuracy, eval_margin = pair_loss(rm, heldout, max_len)
                model.train()
                values.update(eval_accuracy=eval_accuracy.item(), eval_margin=eval_margin.item())
                print(f"step {step + 1}/{max_steps}  loss {values['loss']:.4f}  held-out accuracy "
                      f"{values['eval_accuracy']:.3f}  margin {values['eval_margin']:.3f}", flush=True)
            run.end_step(step + 1, max_steps, values, optimizer, {"reward_model": model})
        model.eval()
        if run.rank == 0:
            model.offset = sampled_mean(lm, rm, [g["prompt"] for g in train[:normalise_samples]], seed, max_len)
        run.save(rm.write, model=False)
    return rm


def pair_loss(rm: RewardLM, groups: list[dict], max_len: int):
    chosen, rejected, group = [], [], []
    for g_index, g in enumerate(groups):
        for c, r in g["pairs"]:
            chosen.append(rm.encode(g["prompt"], c, max_len))
            rejected.append(rm.encode(g["prompt"], r, max_len))
            group.append(g_index)
    rewards = rm.model(*rm.batch(chosen + rejected))
    n = len(chosen)
    return reward_model_loss(rewards[:n], rewards[n:], torch.tensor(group, device=rewards.device))


def sampled_mean(lm, rm: RewardLM, prompts: list[list[dict]], seed: int, max_len: int) -> float:
    """Mean reward of replies the base policy samples: subtracted so the SFT policy scores 0."""
    from engine.generate import generate
    from engine.sampling import Settings
    replies = []
    for i, prompt in enumerate(prompts):
        ids = lm.tokenizer.encode_chat(prompt)[-(lm.max_context - 64):]
        replies.append((prompt, generate(lm, ids, Settings(seed=seed + i, max_new_tokens=48))[0].text))
    rm.model.offset = 0.0
    return sum(rm.rewards(replies, max_len)) / max(len(replies), 1)


def score_file(reward_model: str, path: str, device=None) -> list[dict]:
    """Scores for {"prompt", "response"} rows, or {"prompt", "chosen", "rejected"} rows (both scores)."""
    rm = load_reward_model(reward_model, device)
    from engine.store.exchange import read_jsonl
    out = []
    for number, row, error in read_jsonl(path):
        if error:
            raise ParleyError(f"{path}:{number}: {error}")
        if not isinstance(row, dict) or "prompt" not in row:
            raise ParleyError(f"{path}:{number}: needs prompt and response (or prompt, chosen and rejected)")
        prompt = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        fields = ["response"] if "response" in row else ["chosen", "rejected"]
        texts = []
        for field in fields:
            value = row.get(field)
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
                value = value[0].get("content")
            if not isinstance(value, str):
                raise ParleyError(f"{path}:{number}: {field} must be a text")
            texts.append(value)
        scores = rm.rewards([(prompt, t) for t in texts])
        out.append(dict(zip(fields, scores)))
    return out
