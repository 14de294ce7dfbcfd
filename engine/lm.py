"""A loaded language model: network, tokenizer and configs, on one device in one dtype.

`load(dir)` reads a Hugging Face-format directory; `lm.save(dir)` writes one that transformers
loads as the same model.
"""
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


def load(path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> LM:
    """Load a Hugging Face-format model directory (config.json, safetensors, tokenizer.json)."""
    path = Path(path).expanduser()
    checkpoint.check_model_dir(path)
    hf_config = checkpoint.read_json(path / "config.json")
    if hf_config.get("model_type") == "ngram":
        return _load_ngram(path, hf_config, pick_device(device))
    fam = family(hf_config.get("model_type"))
    try:
        config = fam.Config.from_hf(hf_config)
    except KeyError as e:
        raise ParleyError(f"{path / 'config.json'} lacks {e.args[0]!r}, which a {hf_config['model_type']} "
                          "model needs: re-save the model's config") from None
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    tokenizer = Tokenizer.from_dir(path)
    generation_config = checkpoint.read_json(path / "generation_config.json", required=False)

    # Build on the meta device (no memory, no random init), then adopt the checkpoint's tensors.
    with torch.device("meta"):
        model = fam.Model(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in model.tied_keys}
    tensors = fam.state_from_hf(checkpoint.read_tensors(path, device, dtype))
    for key in model.tied_keys:  # some checkpoints store the tied copy as well
        tensors.pop(key, None)
    checkpoint.check_tensors(checkpoint.weight_files(path)[0], expected, tensors)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    model.to(device)
    return LM(model, tokenizer, hf_config, generation_config, path)


def _load_ngram(path: Path, config: dict, device: torch.device) -> LM:
    from engine.models.ngram import NGramLM, NGramNetwork
    if not (path / "ngram.safetensors").is_file():
        raise ParleyError(f"{path} has no ngram.safetensors: an n-gram model directory needs its counts")
    tokenizer = Tokenizer.from_dir(path)
    network = NGramNetwork(NGramLM.from_dir(path, config)).to(device)
    generation_config = checkpoint.read_json(path / "generation_config.json", required=False)
    return LM(network, tokenizer, config, generation_config, path)
