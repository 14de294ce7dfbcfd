"""The configuration of every `parley train` mode: one dataclass per mode, after TRL's config
per trainer. A field's metadata (its help, choices, whether it is required) is also its
command-line flag: engine/cli.py builds `parley train MODE --help` from these classes, so every
field has a flag and nothing is listed twice.

    tokenizer  TokenizerConfig      pretrain  PretrainConfig     rm    RewardModelConfig
    ngram      NGramConfig          sft       SFTConfig          dpo   DPOConfig
    ppo        PPOConfig            rloo      RLOOConfig         grpo  GRPOConfig
    mlm        MLMConfig (BERT)       word2vec  Word2VecConfig    elmo  ElmoConfig

`TRAINERS` names the function that runs each mode on its config (imported only when run, so
reading a config imports no torch).
"""
import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

from engine.errors import ParleyError

# The values a number may take, in the words its error shows. A whole number is a count (1 or
# more) and a real one is positive unless its field names another rule; every one must be finite.
RULES = {
    "count": (lambda v: v >= 1, "1 or more"),
    "two": (lambda v: v >= 2, "2 or more (each reply's baseline is the others')"),
    "count0": (lambda v: v >= 0, "0 or more"),
    "positive": (lambda v: v > 0, "greater than 0"),
    "fraction": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "decay": (lambda v: 0 < v < 1, "between 0 and 1, both excluded"),
    "seed": (lambda v: 0 <= v < 2**63, "between 0 and 2**63 - 1"),
    "finite": (lambda v: True, "a finite number"),
}


def option(default, help: str, *, choices: tuple | None = None, required: bool = False, rule: str | None = None):
    """A config field with what its flag shows: help, choices, required, and for a number its rule."""
    return field(default=default, metadata={"help": help, "choices": choices, "required": required, "rule": rule})


@dataclass
class TokenizerConfig:
    """A byte-level BPE with ChatML special tokens (engine/train/tokenizer.py)."""
    mode: ClassVar[str] = "tokenizer"
    out: str = option(None, "output directory", required=True)
    data: str | None = option(None, "chitchat (the built-in corpus, default), a .jsonl of conversations or a .txt")
    vocab_size: int = option(4096, "vocabulary size")


@dataclass
class NGramConfig:
    """An n-gram model counted over a tokenizer's ids (engine/train/ngram.py)."""
    mode: ClassVar[str] = "ngram"
    out: str = option(None, "output directory", required=True)
    tokenizer: str = option(None, "the tokenizer directory (the neural models' one, to compare fairly)",
                            required=True)
    data: str | None = option(None, "chitchat (default), a .jsonl of conversations or a .txt")
    order: int = option(3, "N")
    smoothing: str = option("kneser_ney", "smoothing method", choices=("mle", "add_k", "katz", "kneser_ney"))
    k: float = option(1.0, "add-k's k (1 = Laplace)")


@dataclass
class StepsConfig:
    """What every trainer that takes optimizer steps has: its output, length, seed and checkpoints."""
    out: str = option(None, "output directory (checkpoints go to OUT/checkpoints)", required=True)
    max_steps: int = option(1000, "optimizer steps")
    lr: float = option(1e-3, "learning rate")
    seed: int = option(0, "random seed: the run is a pure function of it", rule="seed")
    device: str | None = option(None, "cpu, cuda or mps (default: the best available)")
    eval_every: int = option(100, "steps between held-out evaluations")
    save_every: int = option(200, "steps between checkpoints")
    resume: bool = option(False, "continue from the newest checkpoint in --out (with the options the run started with)")
    lora_r: int | None = option(None, "train a LoRA adapter of this rank instead of every weight (engine/lora.py); "
                                "OUT is then an adapter directory in PEFT's format, which loads as base + adapter")
    lora_alpha: float | None = option(None, "LoRA's alpha: the adapter is scaled by alpha / r (default 2 x r)")
    lora_targets: str | None = option(None, "comma-separated names of the layers to adapt, e.g. q_proj,v_proj "
                                      "(default: every projection of the blocks)")


@dataclass
class PretrainConfig(StepsConfig):
    """Next-token loss on every token, from a model or a fresh preset (engine/train/trainer.py)."""
    mode: ClassVar[str] = "pretrain"
    data: str | None = option(None, "chitchat (the built-in corpus, default), a .jsonl of conversations or a .txt")
    model: str | None = option(None, "start from this model (a directory or a known name) ...")
    preset: str | None = option(None, "... or from a fresh model of a preset family and size (chat-6m, nnlm, lstm, "
                                "gpt-fixed, ...: a wrong name lists them all)")
    tokenizer: str | None = option(None, "the tokenizer directory of a fresh model (--preset)")
    seq_len: int = option(256, "tokens per training row")
    batch_size: int = option(32, "rows per optimizer step, over all processes and accumulation steps")
    grad_accum: int = option(1, "accumulation steps per optimizer step")
    min_lr_ratio: float = option(0.1, "the cosine schedule ends at lr x this", rule="fraction")
    warmup_steps: int = option(100, "steps of linear warm-up", rule="count0")
    weight_decay: float = option(0.1, "AdamW weight decay (on matrices only)", rule="count0")
    grad_clip: float = option(1.0, "gradient norm clip")
    eval_batches: int = option(10, "held-out batches per evaluation")
    autocast: str = option("auto", "bfloat16 mixed precision (auto: on CUDA only)", choices=("auto", "bf16", "none"))


@dataclass
class SFTConfig(PretrainConfig):
    """Supervised fine-tuning: the pretraining loop with the loss on assistant tokens only."""
    mode: ClassVar[str] = "sft"
    aux_lm: float = option(0.0, "GPT-1's auxiliary objective: add this x the language-model loss on the other "
                           "(prompt) tokens, L3 = L2 + lambda x L1; 0 is off", rule="count0")


@dataclass
class MLMConfig(StepsConfig):
    """BERT: masked-language-model pretraining, 15% of tokens, 80/10/10 (engine/train/mlm.py)."""
    mode: ClassVar[str] = "mlm"
    data: str | None = option(None, "chitchat (the built-in corpus, default), a .jsonl of conversations or a .txt")
    tokenizer: str = option(None, "the tokenizer directory (the causal models' one, to compare fairly); "
                            "[CLS], [SEP], [MASK] and [PAD] are added to it", required=True)
    hidden_size: int = option(256, "width of the encoder")
    layers: int = option(4, "encoder layers")
    heads: int = option(4, "attention heads (must divide --hidden-size)")
    seq_len: int = option(128, "tokens per training row, [CLS] and [SEP] included")
    batch_size: int = option(32, "rows per optimizer step")
    mask_rate: float = option(0.15, "share of tokens the model is asked about", rule="fraction")
    warmup_steps: int = option(100, "steps of linear warm-up", rule="count0")
    min_lr_ratio: float = option(0.1, "the cosine schedule ends at lr x this", rule="fraction")
    weight_decay: float = option(0.01, "AdamW weight decay (on matrices only)", rule="count0")
    grad_clip: float = option(1.0, "gradient norm clip")
    eval_batches: int = option(4, "held-out batches per evaluation")


@dataclass
class Word2VecConfig:
    """word2vec word vectors: skip-gram or CBOW, negative sampling or hierarchical softmax (engine/train/word2vec.py).

    Over words (engine/models/word2vec.py says how text becomes words), or with `tokenizer` over a
    tokenizer's tokens, the units the language models of the family table read. Each
    epoch sub-samples frequent words afresh, draws each centre word's window size in 1 … window (so
    near words count more, as in word2vec.c) and takes shuffled batches of pairs; plain SGD on the
    summed loss (capped for a word a batch holds very often) with the rate decaying linearly to 0,
    word2vec.c's schedule. Sentences are the corpus's lines or messages: no window crosses one's end.
    """
    mode: ClassVar[str] = "word2vec"
    out: str = option(None, "output directory", required=True)
    data: str | None = option(None, "chitchat (the built-in corpus, default), a .jsonl of conversations or a .txt")
    architecture: str = option("skipgram", "skipgram: a word predicts its neighbours; cbow: the neighbours' mean "
                               "predicts the word", choices=("skipgram", "cbow"))
    loss: str = option("negative", "negative sampling or hierarchical softmax (over the Huffman tree of the counts)",
                       choices=("negative", "hierarchical"))
    dim: int = option(100, "vector size")
    window: int = option(5, "the most words either side of the centre word")
    negative: int = option(5, "noise words per pair (negative sampling)")
    sample: float = option(1e-3, "sub-sampling threshold: words more frequent than this are dropped at random "
                           "(0: keep all)", rule="fraction")
    min_count: int = option(5, "words seen fewer times than this are left out")
    tokenizer: str | None = option(None, "a tokenizer directory whose tokens are the units instead of words (the "
                                   "language models' one, to train on the same units)")
    epochs: int = option(5, "passes over the corpus")
    lr: float | None = option(None, "starting learning rate (default 0.025 for skipgram, 0.05 for cbow, as word2vec)")
    batch_size: int = option(1024, "pairs (skipgram) or centre words (cbow) per SGD step")
    seed: int = option(0, "random seed: the run is a pure function of it", rule="seed")
    device: str | None = option(None, "cpu, cuda or mps (default: the best available)")


@dataclass
class ElmoConfig:
    """ELMo: a character-CNN bidirectional LSTM language model, both directions at once (engine/train/elmo.py).

    Over words, as word2vec reads them (engine/models/word2vec.py `words`), each sentence (a line or a
    message) between <s> and </s>; the softmax covers the words seen at least --min-count times, the
    others are <unk> as targets but keep their own characters as input. Adam on the mean of the
    forward and the backward LM's cross-entropy.
    """
    mode: ClassVar[str] = "elmo"
    out: str = option(None, "output directory", required=True)
    data: str | None = option(None, "chitchat (the built-in corpus, default), a .jsonl of conversations or a .txt")
    min_count: int = option(2, "words seen fewer times than this are <unk> in the softmax")
    projection_dim: int = option(128, "width of the token vectors and of each LSTM layer's output (the paper: 512)")
    hidden_size: int = option(512, "LSTM cells per layer and direction (the paper: 4096)")
    char_dim: int = option(16, "character embedding size")
    filters: str = option("1:32,2:32,3:64,4:128,5:256", "the character convolutions, width:count, comma-separated "
                          "(the paper: 1:32,2:32,3:64,4:128,5:256,6:512,7:1024)")
    highway_layers: int = option(2, "highway layers over the convolutions", rule="count0")
    max_characters: int = option(50, "characters per word, the begin and end marks included (longer words are cut)")
    max_len: int = option(64, "words per training row, <s> and </s> included (longer sentences: rows overlapping by a word)",
                          rule="two")
    batch_size: int = option(32, "rows per optimizer step")
    max_steps: int = option(1000, "optimizer steps")
    lr: float = option(1e-3, "Adam learning rate")
    grad_clip: float = option(1.0, "gradient norm clip")
    eval_every: int = option(100, "steps between held-out evaluations")
    eval_batches: int = option(4, "held-out batches per evaluation")
    seed: int = option(0, "random seed: the run is a pure function of it", rule="seed")
    device: str | None = option(None, "cpu, cuda or mps (default: the best available)")


@dataclass
class PreferenceConfig(StepsConfig):
    """What the reward model and DPO share: the pairs, read as whole prompts in one length."""
    prefs: str = option(None, "preference pairs: store (your rankings) or a TRL-format .jsonl", required=True)
    prompts_per_step: int = option(8, "prompts per step, each with all its pairs")
    max_len: int = option(256, "tokens per prompt + reply; a pair whose reply alone is longer is skipped and counted")


@dataclass
class RewardModelConfig(PreferenceConfig):
    """InstructGPT's pairwise loss on whole prompts, then rewards normalised on the base's samples."""
    mode: ClassVar[str] = "rm"
    base: str = option(None, "the backbone model (a directory or known name)", required=True)
    max_steps: int = option(200, "optimizer steps")
    lr: float = option(5e-4, "learning rate")
    eval_every: int = option(50, "steps between held-out evaluations")
    save_every: int = option(50, "steps between checkpoints")
    normalise_samples: int = option(64, "base-policy samples the reward offset and scale are measured on")
    reward_scale: bool = option(True, "scale rewards to standard deviation 1 on the base policy's samples, besides "
                                "shifting them to mean 0")
    temperature: float = option(1.0, "temperature of the samples the rewards are normalised on (the rollouts')")
    max_new_tokens: int = option(32, "length of the samples the rewards are normalised on (the rollouts')")


@dataclass
class DPOConfig(PreferenceConfig):
    """The sigmoid DPO loss against the frozen starting policy."""
    mode: ClassVar[str] = "dpo"
    policy: str = option(None, "the policy to fine-tune (also the frozen reference)", required=True)
    beta: float = option(0.1, "the KL strength beta")
    max_steps: int = option(100, "optimizer steps")
    lr: float = option(5e-5, "learning rate")
    eval_every: int = option(25, "steps between held-out evaluations")
    save_every: int = option(50, "steps between checkpoints")


@dataclass
class OnlineConfig(StepsConfig):
    """What PPO, RLOO and GRPO share: the policy, its reward model, the prompts and the rollouts."""
    policy: str = option(None, "the policy to fine-tune (also the frozen reference)", required=True)
    reward_model: str = option(None, "the reward model directory", required=True)
    prompts: str | None = option(None, 'JSONL of {"prompt": messages or text}; default: the store\'s chats')
    max_steps: int = option(50, "rollout steps")
    lr: float = option(1e-5, "learning rate")
    beta: float = option(0.05, "the KL strength beta", rule="count0")
    target_kl: float | None = option(None, "adapt beta towards this KL per reply (Ziegler et al. 2019)")
    temperature: float = option(1.0, "rollout temperature (log-probabilities use logits / T too)")
    max_new_tokens: int = option(32, "reply length in rollouts")
    rollout_quantize: str | None = option(None, "draw rollouts from an int8 copy of the policy made each step "
                                          "(CPU; faster decoding, log-probabilities still from the float policy)",
                                          choices=("int8",))
    missing_eos_penalty: float = option(1.0, "subtracted from the score of a reply that never reaches EOS", rule="finite")
    score_clip: float = option(10.0, "scores are clipped to +- this")
    clip: float = option(0.2, "the clip range epsilon of the policy ratio (and of PPO's values)")
    eval_every: int = option(10, "steps between held-out evaluations")
    eval_prompts: int = option(32, "held-out prompts per evaluation")
    save_every: int = option(10, "steps between checkpoints")


@dataclass
class PPOConfig(OnlineConfig):
    """PPO with a critic, GAE and the N implementation details (engine/rlhf/ppo.py)."""
    mode: ClassVar[str] = "ppo"
    batch_size: int = option(16, "rollouts (prompts, one reply each) per step")
    minibatch_size: int = option(8, "rollouts per optimizer update")
    ppo_epochs: int = option(4, "passes over each step's rollouts")
    critic_lr: float | None = option(None, "the critic's learning rate (default: 10 x --lr)")
    lr_schedule: str = option("constant", "learning rate constant or decaying linearly to 0",
                              choices=("constant", "linear"))
    vf_coef: float = option(0.1, "weight of the value loss", rule="count0")
    gamma: float = option(1.0, "discount", rule="fraction")
    lam: float = option(0.95, "GAE lambda", rule="fraction")
    ptx_coef: float = option(0.0, "weight of the pretraining loss on --data (PPO-ptx); 0 is off", rule="count0")
    ptx_batch: int = option(4, "pretraining rows per update for the ptx term")
    data: str | None = option(None, "ptx: chitchat (default), a .jsonl of conversations or a .txt")
    ema: float | None = option(None, "keep and save an exponential moving average of the policy with this decay", rule="decay")


@dataclass
class GroupConfig(OnlineConfig):
    """k replies per prompt, no critic (engine/rlhf/group.py)."""
    prompts_per_step: int = option(8, "prompts per step")
    replies: int = option(4, "replies sampled per prompt (k)", rule="two")
    epochs: int = option(1, "passes over each rollout")
    minibatch_prompts: int | None = option(None, "prompts per update (default: all of a step's)")
    kl_estimator: str = option("k1", "KL estimator", choices=("k1", "k3"))


@dataclass
class RLOOConfig(GroupConfig):
    """Leave-one-out baseline, KL (k1) in the reward, one ratio per reply (TRL's RLOOTrainer)."""
    mode: ClassVar[str] = "rloo"


@dataclass
class GRPOConfig(GroupConfig):
    """Group-normalised advantages, KL (k3) in the loss, one ratio per token (TRL's GRPOTrainer)."""
    mode: ClassVar[str] = "grpo"
    beta: float = option(0.04, "the KL strength beta")
    kl_estimator: str = option("k3", "KL estimator", choices=("k1", "k3"))


CONFIGS = {c.mode: c for c in (TokenizerConfig, NGramConfig, PretrainConfig, SFTConfig, MLMConfig, Word2VecConfig,
                               ElmoConfig, RewardModelConfig, DPOConfig, PPOConfig, RLOOConfig, GRPOConfig)}

# mode: (module, function); each function takes (config, store) and returns what it trained
TRAINERS = {"tokenizer": ("engine.train.tokenizer", "run"), "ngram": ("engine.train.ngram", "run"),
            "pretrain": ("engine.train.trainer", "train"), "sft": ("engine.train.trainer", "train"),
            "mlm": ("engine.train.mlm", "train_mlm"), "word2vec": ("engine.train.word2vec", "run"),
            "elmo": ("engine.train.elmo", "run"),
            "rm": ("engine.rlhf.reward_model", "train_reward_model"), "dpo": ("engine.rlhf.dpo", "train_dpo"),
            "ppo": ("engine.rlhf.ppo", "train_ppo"), "rloo": ("engine.rlhf.group", "train_group"),
            "grpo": ("engine.rlhf.group", "train_group")}


def validate(config) -> None:
    """Refuse a bad number or output before any work: `--lr nan` or an `--out` that is a file must
    not cost a run (engine/files.py says which output directories Parley writes into)."""
    from engine.files import check_output_dir
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ok, words = RULES[f.metadata["rule"] or ("count" if isinstance(value, int) else "positive")]
        if not (math.isfinite(value) and ok(value)):
            raise ParleyError(f"--{f.name.replace('_', '-')} {value} is out of range: it must be {words}")
    if getattr(config, "lora_r", None) is None and (getattr(config, "lora_alpha", None) is not None
                                                    or getattr(config, "lora_targets", None) is not None):
        raise ParleyError("--lora-alpha and --lora-targets shape a LoRA adapter: add --lora-r R (e.g. 8)")
    check_output_dir(config.out)


def run(config, store=None):
    """Train what `config` describes with its mode's trainer."""
    import importlib
    validate(config)
    module, name = TRAINERS[config.mode]
    return getattr(importlib.import_module(module), name)(config, store)
