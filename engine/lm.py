"""A loaded language model: network, tokenizer and configs, on one device in one dtype.

`load(dir)` reads a Hugging Face-format directory; `lm.save(dir)` writes one that transformers
loads as the same model.
"""
import dataclasses
import math
import types
import typing
from pathlib import Path

import torch

from engine import checkpoint
from engine.device import dtype_name, pick_device, pick_dtype
from engine.errors import ParleyError
from engine.files import output_dir, write_json
from engine.models import family
from engine.tokenizer import Tokenizer


class LM:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, hf_config: dict,
                 generation_config: dict | None = None, path: Path | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = hf_config  # config.json as read (or as written for a new model)
        self.generation_config = dict(generation_config or {})
        self.path = path
        self.quantize = None   # "int8" once engine.quantize.prepare made it so
        self.compiled_step = None   # decode_step through torch.compile (load(..., compile=True))

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    @property
    def max_context(self) -> int:
        c = self.config
        return c.get("max_position_embeddings") or c.get("n_positions") or 2048

    @property
    def eos_token_ids(self) -> list[int]:
        """The ids that end a reply: generation_config.json's, else config.json's, else the tokenizer's."""
        for source in (self.generation_config, self.config):
            ids = source.get("eos_token_id")
            if ids is not None:
                return [ids] if isinstance(ids, int) else list(ids)
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]

    def num_parameters(self) -> int:
        # a count-based model (n-grams) has no weights to count and says its own size
        own = getattr(self.model, "num_parameters", None)
        return own() if own is not None else sum(p.numel() for p in self.model.parameters())

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [batch, seq, vocab] for token ids [batch, seq] (no cache).

        `attention_mask` is 1 for tokens and 0 for left padding, as in transformers.
        """
        input_ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device).bool()
        return self.model(input_ids, pad_mask=attention_mask).float()

    def save(self, path: str | Path) -> None:
        """Write config.json, model.safetensors and the tokenizer files, each atomically (engine/files.py)."""
        from engine.quantize import refuse_if_prepared
        refuse_if_prepared(self, f"save the model to {path}")
        with output_dir(path) as tmp:
            self.write(tmp)
        self.path = Path(path)

    def write(self, directory: Path) -> None:
        """Write the model's files into an existing directory (see `save` for the atomic version)."""
        if self.config.get("model_type") == "ngram":
            self.model.ngram.save_weights(directory)
            write_json(directory / "config.json", self.config)
            self.tokenizer.save(directory)
            return
        fam = family(self.config.get("model_type"))
        state = {k: v for k, v in self.model.state_dict().items() if k not in self.model.tied_keys}
        checkpoint.write_tensors(directory, fam.state_to_hf(state))
        write_json(directory / "config.json", {**self.config, "torch_dtype": dtype_name(self.dtype)})
        if self.generation_config:
            write_json(directory / "generation_config.json", self.generation_config)
        self.tokenizer.save(directory)


def load(path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         decode_only: bool = False, quantize: str | None = None, compile: bool = False) -> LM:
    """Load a Hugging Face-format model directory (config.json, safetensors, tokenizer.json), or a
    LoRA adapter directory (adapter_config.json: its base with the adapter merged, engine/lora.py).

    `decode_only` (implied by `quantize`, "int8", and `compile`): a model that will only decode and
    score, which keeps its weights in their decoding form alone and refuses training and saving
    (engine/quantize.py). `compile`: its decoding step goes through torch.compile, once per model (its
    rows in buckets, engine/graphs.py): on the CPU the compiler fuses what lies between the weight
    products, which stay oneDNN's (engine/models/linear.py, decode_product)."""
    if quantize is not None:
        from engine.quantize import check
        check(quantize, pick_device(device))   # before the reading
    lm = _load(path, device, dtype)
    if decode_only or quantize is not None or compile:
        from engine.quantize import prepare
        prepare(lm, quantize)
    if compile:
        from engine.generate import decode_step
        lm.compiled_step = torch.compile(decode_step, fullgraph=True, dynamic=True)
    return lm


def _load(path, device, dtype) -> LM:
    path = Path(path).expanduser()
    checkpoint.check_model_dir(path)
    if (path / "adapter_config.json").is_file():
        from engine import lora
        return lora.load(path, device, dtype)
    hf_config = checkpoint.read_json(path / "config.json")
    if hf_config.get("model_type") == "ngram":
        return _load_ngram(path, hf_config, pick_device(device))
    fam = family(hf_config.get("model_type"))
    config = _read_config(path / "config.json", fam.Config, hf_config)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    tokenizer = Tokenizer.from_dir(path)
    _check_tokenizer_fits(path, tokenizer, config.vocab_size)
    generation_config = checkpoint.read_json(path / "generation_config.json", required=False)
    for file, source in ((path / "config.json", hf_config), (path / "generation_config.json", generation_config)):
        _check_eos_ids(file, (source or {}).get("eos_token_id"), config.vocab_size)

    # Build on the meta device (no memory, no random init), then adopt the checkpoint's tensors.
    with torch.device("meta"):
        model = fam.Model(config)
    expected = {k: v for k, v in model.state_dict().items() if k not in model.tied_keys}
    tensors = fam.state_from_hf(checkpoint.read_tensors(path, device, dtype))
    for key in model.tied_keys:  # some checkpoints store the tied copy as well
        tensors.pop(key, None)
    checkpoint.check_tensors(checkpoint.weight_files(path)[0], expected, tensors)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    model.to(device)
    return LM(model, tokenizer, hf_config, generation_config, path)


# -- checks on what a model directory says -------------------------------------------------------
# config.json is read by each family's Config.from_hf; the checks here are generic, from the types of
# the Config dataclass's fields, so that every family (and every new one) gets them: a field given
# in config.json must have its field's type, and a whole-number field is a size (at least 1) unless
# its default says otherwise (a default of 0 allows 0, a negative one any value; *_id fields are ids).

# Pairs (part, whole) of config fields where the part must divide the whole, when a family has both.
_DIVIDES = (("n_head", "n_embd"), ("num_attention_heads", "hidden_size"),
            ("num_key_value_heads", "num_attention_heads"))


def _read_config(file: Path, config_class, hf: dict):
    """The family's Config from config.json, or one line naming the field that is wrong."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name: (hints.get(f.name), f.default) for f in dataclasses.fields(config_class)}
    for name, (kind, default) in fields.items():   # before from_hf, which computes with them
        if hf.get(name) is not None:
            _check_field(file, name, hf[name], kind, default)
    try:
        config = config_class.from_hf(hf)
    except KeyError as e:
        raise ParleyError(f"{file} lacks {e.args[0]!r}, which a {hf['model_type']} model needs: "
                          "re-save the model's config") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise ParleyError(f"{file} has a value Parley cannot use ({type(e).__name__}: {e}): "
                          "fix config.json or re-save the model") from None
    for name, (kind, default) in fields.items():   # after: what from_hf derived or defaulted
        _check_field(file, name, getattr(config, name), kind, default)
    for part, whole in _DIVIDES:
        p, w = getattr(config, part, None), getattr(config, whole, None)
        if whole == "hidden_size" and hf.get("head_dim"):
            continue   # an explicit head_dim need not divide the width (heads * head_dim may differ)
        if isinstance(p, int) and isinstance(w, int) and w % p:
            raise ParleyError(f"{file}: {part} {p} does not divide {whole} {w}: fix config.json or re-save the model")
    return config


def _check_field(file: Path, name: str, value, kind, default) -> None:
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
        if value is None:
            return
    fix = "fix config.json or re-save the model"
    if kind is bool and not isinstance(value, bool):
        raise ParleyError(f"{file}: {name} is {value!r}, but it must be true or false: {fix}")
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ParleyError(f"{file}: {name} is {value!r}, but it must be a whole number: {fix}")
        low = None if name.endswith("_id") or (isinstance(default, int) and default < 0) else 0 if default == 0 else 1
        if low is not None and value < low:
            raise ParleyError(f"{file}: {name} is {value}, but it must be {low} or more: {fix}")
    if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
        raise ParleyError(f"{file}: {name} is {value!r}, but it must be a finite number: {fix}")
    if kind in (str, dict, list) and not isinstance(value, kind):
        raise ParleyError(f"{file}: {name} is {value!r}, but it must be a JSON "
                          f"{ {str: 'string', dict: 'object', list: 'array'}[kind]}: {fix}")


def _check_eos_ids(file: Path, ids, vocab_size: int) -> None:
    """eos_token_id, where given, must be token ids the model has: an id it cannot produce never ends a reply."""
    if ids is None:
        return
    for i in ids if isinstance(ids, list) else [ids]:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
            raise ParleyError(f"{file}: eos_token_id {ids!r} is not a token id of this model (0 to {vocab_size - 1}): "
                              f"fix or remove it in {file.name}")


def _check_tokenizer_fits(path: Path, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Every id the tokenizer can produce must be a row of the model's embedding.

    The other way round is fine: models often pad their embedding past the tokenizer (to a multiple
    of 64 or 128, for speed), and the ids past it decode to nothing. The tokenizer's own soundness
    (at least two tokens, its end token present) is checked by Tokenizer.from_dir.
    """
    if tokenizer.max_id >= vocab_size:
        raise ParleyError(f"{path / 'tokenizer.json'} has ids up to {tokenizer.max_id}, but the model "
                          f"(vocab_size {vocab_size} in config.json) embeds only ids 0 to {vocab_size - 1}: "
                          "the tokenizer belongs to another model; copy the model's own tokenizer files")


def _load_ngram(path: Path, config: dict, device: torch.device) -> LM:
    from engine.models.ngram import NGramLM, NGramNetwork
    if not (path / "ngram.safetensors").is_file():
        raise ParleyError(f"{path} has no ngram.safetensors: an n-gram model directory needs its counts")
    tokenizer = Tokenizer.from_dir(path)
    network = NGramNetwork(NGramLM.from_dir(path, config)).to(device)
    generation_config = checkpoint.read_json(path / "generation_config.json", required=False)
    return LM(network, tokenizer, config, generation_config, path)
