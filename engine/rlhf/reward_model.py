"""`parley train rm` and `parley score`: a reward model from the user's rankings.

Any engine decoder is the backbone; a scalar head reads the final hidden state at the last
non-pad token of prompt + response (the pad id differs from EOS, so EOS is read, not skipped).
Each training batch holds whole prompts with all their pairs (InstructGPT), and the loss is
-1/C(K,2) sum log sigmoid(r(x, y_w) - r(x, y_l)) per prompt. A row is the prompt's last
tokens and the whole reply, in `max_len` tokens (prefs.fit_prompt): the length PPO, RLOO and
GRPO then score at, so the model is never asked about contexts longer than it was trained on.

After training, rewards are normalised on replies that a fresh copy of the base (SFT) policy
samples at the rollout settings the online trainers use (engine.rlhf.rollout): shifted so they
score 0 on average and (unless `reward_scale` is off) scaled to standard deviation 1, as lm-human-
preferences does. The scale is what makes beta mean the same for every reward model: a raw head
spread over +-11 (benchmarks/rlhf_demo.py) makes a KL penalty of a few tenths invisible, and PPO then collapses replies
onto whatever scores highest. (The backbone trained here is not the policy any more, so its samples would
be the wrong ones to normalise on.)

The directory is saved in transformers' ...ForSequenceClassification layout (the backbone's
tensors, minus lm_head, plus `score.weight`), with Parley's offset, scale, the settings they
were measured at and the length in config.json.

A BERT (`parley train mlm`) is a backbone too: `--base BERT_DIR`. It reads a row whole, so it
reads it as BERT's classifiers do: [CLS] prompt [SEP] reply [SEP] (plain text, as it was
pretrained: a BERT has no chat template), the head on the last hidden state of [CLS].
transformers' BertForSequenceClassification puts a pooler (dense + tanh) between the two; we
have none, because next-sentence prediction trains it and `parley train mlm` does not do that,
so it would start random: the linear head reads [CLS] directly, and the directory names its
architecture ParleyBertForSequenceClassification (transformers cannot read the head). A BERT
cannot sample, so its rewards are normalised on the replies of its own training pairs; it
scores (`parley score`) but is not PPO's critic, nor the reward of PPO, RLOO or GRPO (whose
policy's tokenizer it does not share).
"""
import math
import random
from itertools import islice
from pathlib import Path

import torch
import torch.nn as nn

from engine import checkpoint, lora
from engine.device import pick_device
from engine.errors import ParleyError
from engine.files import output_dir, write_json
from engine.models import bert, family
from engine.rlhf.losses import reward_model_loss
from engine.rlhf.prefs import encoded_split, fit_prompt, preference_groups, prompt_batches, reply_ids, right_pad
from engine.rlhf.rollout import Sampling, reward_normaliser
from engine.tokenizer import Tokenizer
from engine.train import distributed
from engine.train.config import RewardModelConfig
from engine.train.run import Run, load_model

CLASSIFIERS = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
               "qwen3": "Qwen3ForSequenceClassification", "mistral": "MistralForSequenceClassification",
               "smollm3": "SmolLM3ForSequenceClassification", "phi3": "Phi3ForSequenceClassification",
               "gemma2": "Gemma2ForSequenceClassification", "gemma3_text": "Gemma3TextForSequenceClassification",
               "gpt2": "GPT2ForSequenceClassification"}
BERT_CLASSIFIER = "ParleyBertForSequenceClassification"   # not transformers' layout: no pooler (see above)


def is_bert(config: dict) -> bool:
    return config.get("model_type") == "bert"


def bert_reply_ids(tokenizer, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """A BERT's (prompt ids, reply ids): the messages' plain text and [SEP], the reply and [SEP].
    The [CLS] before them is BertRewardModel's to add, so a prompt cut to fit never loses it."""
    from engine.train.mlm import text_of
    _, sep = bert.special_ids(tokenizer, "cls_token", "sep_token")
    return (tokenizer.encode(text_of(prompt), add_special_tokens=False) + [sep],
            tokenizer.encode(reply, add_special_tokens=False) + [sep])


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, offset: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.backbone = backbone
        width = backbone.config.hidden_size if isinstance(backbone, bert.Bert) else backbone.lm_head.weight.shape[1]
        self.score = nn.Linear(width, 1, bias=False)
        self.offset, self.scale = offset, scale

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw head outputs to rewards: (raw - offset) / scale. PPO's critic, a copy of this
        model, applies the same, so its first values are on the scale of the rewards."""
        return (raw.float() - self.offset) / self.scale

    def forward(self, idx: torch.Tensor, pad_mask: torch.Tensor, every_position: bool = False) -> torch.Tensor:
        """One reward per right-padded row of token ids; with `every_position`, one per position
        (PPO's critic: the value of each state)."""
        hidden = self.backbone.hidden_states(idx, pad_mask=pad_mask)
        if every_position:
            return self.normalise(self.score(hidden).squeeze(-1))
        last = pad_mask.long().cumsum(1).argmax(1)    # the last non-pad position
        return self.normalise(self.score(hidden[torch.arange(len(idx), device=idx.device), last]).squeeze(-1))


class BertRewardModel(RewardModel):
    """A reward from BERT's [CLS] state: the [CLS] goes in front of each row here, and the MLM
    head is dropped (a reward model reads hidden states only)."""

    def __init__(self, backbone: bert.Bert, cls_id: int, offset: float = 0.0, scale: float = 1.0):
        backbone.cls = nn.Module()
        super().__init__(backbone, offset, scale)
        self.cls_id = cls_id

    def forward(self, idx: torch.Tensor, pad_mask: torch.Tensor, every_position: bool = False) -> torch.Tensor:
        if every_position:
            raise ParleyError("a BERT reward model reads each row whole, so it has no value per position for PPO's "
                              "critic: train the reward model on the policy (parley train rm --base POLICY)")
        first = torch.ones_like(pad_mask[:, :1])
        hidden = self.backbone.hidden_states(torch.cat([torch.full_like(idx[:, :1], self.cls_id), idx], 1),
                                             pad_mask=torch.cat([first, pad_mask], 1))
        return self.normalise(self.score(hidden[:, 0]).squeeze(-1))


class RewardLM:
    """A reward model with its tokenizer and config; `rewards` scores (prompt, response) pairs."""

    def __init__(self, model: RewardModel, tokenizer: Tokenizer, config: dict):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.split = bert_reply_ids if is_bert(config) else reply_ids   # how a prompt and a reply become ids
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None or self.pad_id in (config.get("eos_token_id"), tokenizer.eos_token_id):
            raise ParleyError("a reward model needs a pad token distinct from EOS: add pad_token to "
                              "tokenizer_config.json")

    @property
    def device(self):
        return self.model.score.weight.device

    @property
    def max_len(self) -> int:
        """The length the model was trained at, and so the length everything scores at."""
        return self.config.get("parley_max_length", 256)

    def fit(self, prompt_ids: list[int], reply: list[int]) -> list[int]:
        """The row the model reads: the prompt's end and the whole reply in max_len tokens."""
        window = fit_prompt(prompt_ids, [reply], self.max_len)
        if window is None:
            raise ParleyError(f"a response of {len(reply)} tokens does not fit the reward model's length of "
                              f"{self.max_len} tokens: shorten it, or train the reward model with a larger --max-len")
        return window + reply

    def encode(self, prompt: list[dict], response: str) -> list[int]:
        return self.fit(*self.split(self.tokenizer, prompt, response))

    def batch(self, rows: list[list[int]]):
        return right_pad(rows, self.pad_id, self.device)

    def score_rows(self, rows: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """The reward of each row of token ids, `batch_size` rows at a time."""
        with torch.no_grad():
            return torch.cat([self.model(*self.batch(rows[i:i + batch_size])) for i in range(0, len(rows), batch_size)])

    def rewards(self, pairs: list[tuple[list[dict], str]]) -> list[float]:
        return self.score_rows([self.encode(p, r) for p, r in pairs]).tolist()

    def save(self, path: str | Path) -> None:
        with output_dir(path) as tmp:
            self.write(tmp)

    def write(self, directory: Path) -> None:
        backbone = self.model.backbone
        if is_bert(self.config):
            tensors, architecture = dict(backbone.state_dict()), BERT_CLASSIFIER   # the MLM head is gone already
        else:
            fam = family(self.config["model_type"])
            state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("lm_head")}
            tensors, architecture = fam.state_to_hf(state), CLASSIFIERS[self.config["model_type"]]
        tensors["score.weight"] = self.model.score.weight
        config = {**self.config, "architectures": [architecture], "num_labels": 1,
                  "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "pad_token_id": self.pad_id,
                  "parley_reward_offset": self.model.offset, "parley_reward_scale": self.model.scale}
        checkpoint.write_tensors(directory, tensors)
        write_json(directory / "config.json", config)
        self.tokenizer.save(directory)


def load_reward_model(path: str | Path, device=None) -> RewardLM:
    from engine.registry import resolve_model
    path = resolve_model(str(path))   # a directory, a known name or org/name from the Hugging Face cache
    checkpoint.check_model_dir(path)
    config = checkpoint.read_json(path / "config.json")
    if not str((config.get("architectures") or [""])[0]).endswith("ForSequenceClassification"):
        raise ParleyError(f"{path} is not a reward model (its architectures is {config.get('architectures')}): "
                          "train one with `parley train rm`")
    device = pick_device(device)
    if is_bert(config):
        return load_bert_reward_model(path, config, device)
    fam = family(config.get("model_type"))
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
    model = RewardModel(backbone, config.get("parley_reward_offset", 0.0), config.get("parley_reward_scale", 1.0))
    model.to(device)
    model.score.weight = nn.Parameter(score)
    return RewardLM(model.eval(), Tokenizer.from_dir(path), config)


def load_bert_reward_model(path: Path, config: dict, device) -> RewardLM:
    with torch.device("meta"):
        backbone = bert.Bert(bert.BertConfig.from_hf(config))
    tokenizer = Tokenizer.from_dir(path)
    [cls] = bert.special_ids(tokenizer, "cls_token")
    model = BertRewardModel(backbone, cls, config.get("parley_reward_offset", 0.0),
                            config.get("parley_reward_scale", 1.0))
    tensors = checkpoint.read_tensors(path, device, torch.float32)
    score = tensors.pop("score.weight", None)
    if score is None:
        raise ParleyError(f"{path}: tensor 'score.weight' is missing: the reward head was not saved")
    checkpoint.check_tensors(checkpoint.weight_files(path)[0], backbone.state_dict(), tensors)
    backbone.load_state_dict(tensors, assign=True)
    model.score.weight = nn.Parameter(score)
    return RewardLM(model.to(device).eval(), tokenizer, config)


# -- training ----------------------------------------------------------------------------------------
def train_reward_model(c: RewardModelConfig, store=None) -> RewardLM:
    run = Run(c, c.base, store, shown=("loss", "accuracy", "margin", "eval_accuracy", "eval_margin"))
    torch.manual_seed(c.seed)
    if is_bert(config_of(c.base)):
        model, tokenizer, config = start_bert(c, run.device)
    else:
        lm = load_model(c.base, run.device, c)   # with --lora-r, the backbone trains an adapter and the head
        model, tokenizer, config = RewardModel(lm.model).to(lm.device), lm.tokenizer, lm.config
    nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.score.in_features + 1))
    model.train()
    rm = RewardLM(model, tokenizer, {**config, "parley_max_length": c.max_len})
    groups = preference_groups(c.prefs, store)
    train, heldout, run.config["skipped_pairs"] = encoded_split(tokenizer, groups, c.max_len, rm.split)
    if c.prefs == "store":   # what `parley arena --reward-model` leaves out of its held-out agreement
        rm.config["parley_trained_rankings"] = sorted({r for g in train for r in g["rankings"]})
    optimizer = torch.optim.AdamW(lora.trainable(model), lr=c.lr, weight_decay=0.0)
    start = run.restore(optimizer, {"reward_model": lora.checkpointed(model)}).get("step", 0)
    batches = islice(prompt_batches(train, c.prompts_per_step, c.seed), start, c.max_steps)
    trained = run.parallel(model)
    with run:
        for step, batch in enumerate(batches, start):
            mine = run.share(batch)
            loss, accuracy, margin = pair_loss(rm, mine, trained)
            share = len(mine) / len(batch)    # each prompt weighs the same, whichever process has it
            run.update(optimizer, loss * share, [model.parameters()])
            pairs = sum(len(g["pairs"]) for g in mine)
            totals = distributed.sum_values([loss.item() * share, accuracy.item() * pairs, margin.item() * pairs,
                                             pairs], run.device)
            values = {"loss": totals[0], "accuracy": totals[1] / totals[3], "margin": totals[2] / totals[3]}
            if run.rank == 0 and ((step + 1) % c.eval_every == 0 or step + 1 == c.max_steps):
                model.eval()
                with torch.no_grad():
                    _, eval_accuracy, eval_margin = pair_loss(rm, heldout)
                model.train()
                values.update(eval_accuracy=eval_accuracy.item(), eval_margin=eval_margin.item())
            run.end_step(step + 1, values, optimizer, {"reward_model": lora.checkpointed(model)})
        model.eval()
        if run.rank == 0 and is_bert(rm.config):
            model.offset, model.scale = pairs_normaliser(rm, train, c.reward_scale)
            rm.config["parley_reward_normalised_at"] = "the training pairs' replies (a BERT cannot sample)"
            print(f"rewards normalised on the replies of {len(train)} training prompts: offset {model.offset:.4f}, "
                  f"scale {model.scale:.4f}", flush=True)
        elif run.rank == 0:
            # A fresh, frozen copy of the base: the backbone above has been trained into a reward model.
            policy = load_model(c.base, run.device)
            chosen = random.Random(c.seed).sample(train, min(c.normalise_samples, len(train)))
            prompts = [g["prompt"] for g in chosen]
            sampling = Sampling(c.temperature, c.max_new_tokens)
            model.offset, model.scale = reward_normaliser(policy, rm, prompts, sampling, c.seed, c.reward_scale)
            rm.config["parley_reward_normalised_at"] = sampling.to_dict()
            print(f"rewards normalised on {len(prompts)} samples of the base policy: offset {model.offset:.4f}, "
                  f"scale {model.scale:.4f}", flush=True)
        lora.merge(model)   # a reward model is saved whole, in the classification layout PPO and transformers read
        run.save(rm.write, model=False)
    return rm


def config_of(name: str) -> dict:
    """The config.json of the model `name` names, {} where it has none (a known name resolves to one)."""
    from engine.registry import resolve_model
    path = resolve_model(name)
    return (checkpoint.read_json(path / "config.json", required=False) or {}) if path.is_dir() else {}


def start_bert(c: RewardModelConfig, device) -> tuple:
    """(reward model, tokenizer, config) on a BERT backbone (`parley train mlm` wrote it)."""
    from engine.registry import resolve_model
    if c.lora_r is not None:
        raise ParleyError("--lora-r adapts a causal model; a BERT reward model trains whole: drop --lora-r")
    path = resolve_model(c.base)
    backbone, tokenizer = bert.load(path, device)
    if c.max_len + 1 > backbone.config.max_position_embeddings:
        raise ParleyError(f"--max-len {c.max_len} and [CLS] are more than this BERT's "
                          f"{backbone.config.max_position_embeddings} positions: use --max-len "
                          f"{backbone.config.max_position_embeddings - 1} or less")
    model = BertRewardModel(backbone, *bert.special_ids(tokenizer, "cls_token"))
    return model.to(device), tokenizer, backbone.config.to_hf()


@torch.no_grad()
def pairs_normaliser(rm: RewardLM, groups: list[dict], scale: bool) -> tuple[float, float]:
    """(offset, scale) that give the chosen and rejected replies of `groups` raw rewards of mean 0
    (and, with `scale`, standard deviation 1): where the model has no policy of its own to sample."""
    rows = [p + reply for g in groups for p, chosen, rejected in g["pairs"] for reply in (chosen, rejected)]
    offset, old_scale = rm.model.offset, rm.model.scale
    rm.model.offset, rm.model.scale = 0.0, 1.0
    try:
        raw = rm.score_rows(rows)
    finally:
        rm.model.offset, rm.model.scale = offset, old_scale
    std = raw.std().item() if len(raw) > 1 else 1.0
    return raw.mean().item(), (std if scale and std > 1e-6 else 1.0)


def pair_loss(rm: RewardLM, groups: list[dict], model=None):
    """The reward-model loss of encoded whole prompts (prefs.encode_pairs), all rows in one batch,
    under `model` (rm's own, or the same wrapped for training under torchrun)."""
    chosen, rejected, group = [], [], []
    for g_index, g in enumerate(groups):
        for prompt, c, r in g["pairs"]:
            chosen.append(prompt + c)
            rejected.append(prompt + r)
            group.append(g_index)
    rewards = (model or rm.model)(*rm.batch(chosen + rejected))
    n = len(chosen)
    return reward_model_loss(rewards[:n], rewards[n:], torch.tensor(group, device=rewards.device))


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


def score_messages(rm: RewardLM, store, messages: list[dict]) -> dict[str, float | None]:
    """{message id: reward} of stored replies, each read after the context it answers, in batches;
    None for a reply too long for the reward model's length (it is never cut)."""
    rows, ids, out, prompts = [], [], {}, {}
    for m in messages:
        key = (m["conversation_id"], m["parent_id"])
        if key not in prompts:
            prompts[key] = store.prompt_messages(*key)
        try:
            rows.append(rm.encode(prompts[key], m["content"]))
            ids.append(m["id"])
        except ParleyError:
            out[m["id"]] = None
    if rows:
        out.update(zip(ids, rm.score_rows(rows).tolist()))
    return out


def trained_rankings(rm: RewardLM) -> set[str] | None:
    """The ids of the store's rankings the reward model trained on; None where it does not record
    them (trained from a file, or before Parley recorded them)."""
    ids = rm.config.get("parley_trained_rankings")
    return None if ids is None else set(ids)


def agreement_of(rm: RewardLM, store, config=None):
    """engine.arena.agreement for this reward model: its scores of every candidate of the rankings
    it did not train on."""
    from engine.arena import agreement, agreement_candidates
    trained = trained_rankings(rm)
    candidates = agreement_candidates(store, trained)
    return agreement(store, score_messages(rm, store, list(candidates.values())), trained, config)
