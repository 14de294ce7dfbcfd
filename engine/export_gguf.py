"""Write a model as one GGUF file, for llama.cpp and Ollama: `parley export-model --format gguf DIR OUT`.

The file says what llama.cpp's own converter (convert_hf_to_gguf.py) would write for the same
checkpoint, so that llama.cpp reads it with no surprises: the same tensor names (gguf's name map),
the same metadata keys, the byte-level BPE vocabulary as tokens, token types and merges, and the
special tokens and add-BOS flag through gguf's SpecialVocab. Where Parley knows better than the
files on disk it says what Parley does: the chat template is the one Parley renders (a
chat_template.jinja wins over tokenizer_config.json, as in engine/tokenizer.py) and add_bos_token
is whether Parley's tokenizer adds BOS.

Three conventions of llama.cpp's matter for the numbers to come out the same:
- the `llama` architecture (Llama, Mistral) rotates interleaved pairs of each head, where Hugging
  Face rotates halves: q_proj and k_proj rows are permuted to match (`permute`); Qwen2 and Qwen3
  use NEOX-style rotation, which is the halves layout, and are written as they are;
- tied embeddings are one tensor: no output.weight, llama.cpp reuses token_embd.weight;
- 1-D tensors and norms are float32 whatever the file type, as the converter writes them.

Only byte-level BPE tokenizers are written (tokenizer.ggml.model "gpt2"). tokenizer.ggml.pre names
the pre-tokenizer, which llama.cpp re-implements by name; the converter recognises it by hashing
what the tokenizer makes of a test string and refuses one it does not know. Here it is read from
tokenizer.json instead: a plain ByteLevel pre-tokenizer is "gpt-2" (what Parley's own trained
tokenizers are), a split on Llama 3's regex is "llama-bpe", on Qwen2's (Qwen2, 2.5, 3) "qwen2";
any other is refused, since llama.cpp would split text differently from the model's tokenizer.
"""
import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from engine.errors import ParleyError
from engine.files import check_output_file
from engine.models import rope

FORMATS = ("gguf",)
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "f32": "F32", "f16": "F16", "bf16": "BF16"}
ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}   # model_type -> gguf arch
PERMUTED = ("llama", "mistral")   # the architectures whose q/k rows llama.cpp wants interleaved

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {   # the regex of a Split pre-tokenizer -> llama.cpp's name for it
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from halves (x0..x(d/2-1), then the rest) to interleaved pairs."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def unpermute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute` (for reading a file back)."""
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def export_model(model_dir: str | Path, out: str | Path, fmt: str = "gguf", dtype: str | None = None) -> Path:
    """Write the model in `model_dir` to the file `out` (replaced atomically); return its path."""
    import gguf

    import engine
    if fmt not in FORMATS:
        raise ParleyError(f"--format {fmt!r} is not supported: use one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ParleyError(f"--dtype {dtype!r} is not supported: use float16, bfloat16 or float32")
    out = check_output_file(Path(out).expanduser(), "model.gguf")
    model_dir = Path(model_dir).expanduser()
    from engine import checkpoint
    checkpoint.check_model_dir(model_dir)
    model_type = checkpoint.read_json(model_dir / "config.json").get("model_type")
    if model_type not in ARCHS:
        raise ParleyError(f"{model_dir}: export-model --format gguf does not support model_type {model_type!r} "
                          f"yet: it writes {', '.join(ARCHS)}")
    pre = _pre_tokenizer(model_dir)
    stored = _stored_dtype(model_dir)
    qtype = gguf.GGMLQuantizationType[DTYPES[dtype] if dtype else {torch.bfloat16: "BF16"}.get(stored, "F16")]
    lm = engine.load(model_dir, device="cpu", dtype=torch.float32 if stored == torch.float32 else stored)
    c = lm.model.config
    _check_supported(model_dir, c)

    arch = gguf.MODEL_ARCH[ARCHS[model_type]]
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    _write_metadata(writer, gguf, lm, c, qtype, _model_name(model_dir))
    _write_vocab(writer, gguf, lm, model_dir, pre, c.vocab_size)
    _write_tensors(writer, gguf, lm, arch, qtype)

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise ParleyError(f"cannot write {out} ({e.strerror or e}): free space or fix the permissions of "
                          f"{out.parent}, or write elsewhere; nothing was written") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out


def _check_supported(model_dir: Path, c) -> None:
    """Refuse what llama.cpp's architecture would compute differently from Parley."""
    scaling = rope.rope_type(c.rope_scaling)
    if scaling == "llama3" and c.model_type not in PERMUTED:
        raise ParleyError(f"{model_dir}: llama3 rope scaling on {c.model_type} cannot be written to GGUF: "
                          "llama.cpp reads it for the llama architecture only")
    if scaling == "longrope" or getattr(c, "partial_rotary_factor", 1.0) != 1.0:
        raise ParleyError(f"{model_dir}: longrope scaling and partial rotary positions cannot be written to GGUF yet: "
                          "llama.cpp reads them for its phi3 architecture, which export-model does not write")
    if c.sliding_window is not None and c.sliding_window < c.max_position_embeddings:
        raise ParleyError(f"{model_dir}: sliding_window {c.sliding_window} cannot be written to GGUF: llama.cpp's "
                          "llama architecture attends to the whole context, so the file would be another model; "
                          "set sliding_window to null in config.json if the model does not need it")
    if c.nope_layers:
        raise ParleyError(f"{model_dir}: layers without rotary positions (nope_layers) cannot be written to GGUF yet")


def _write_metadata(writer, gguf, lm, c, qtype, name: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if c.head_dim != c.hidden_size // c.num_attention_heads or "head_dim" in lm.config:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    scaling = c.rope_scaling or {}
    if rope.rope_type(scaling) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "BF16": gguf.LlamaFileType.MOSTLY_BF16}[qtype.name])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer, gguf, lm, model_dir: Path, pre: str, vocab_size: int) -> None:
    tok = lm.tokenizer.tokenizer
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):   # ids the tokenizer never makes are padding, as the converter writes them
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        if i in added:
            if not added[i].normalized:   # llama.cpp takes added tokens as already normalised
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            special = added[i].special or token.startswith("<|") and token.endswith("|>") or token == "<pad>"
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    # What Parley does wins over what the files say: its template, and whether encoding adds BOS.
    special.chat_template = lm.tokenizer.chat_template
    bos = special.special_token_ids.get("bos")
    special.add_special_token["bos"] = bos is not None and lm.tokenizer.encode("a")[:1] == [bos]
    special.add_to_gguf(writer, quiet=True)


def _write_tensors(writer, gguf, lm, arch, qtype) -> None:
    c = lm.model.config
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    permuted = c.model_type in PERMUTED
    with torch.no_grad():
        state = {k: v for k, v in lm.model.state_dict().items() if k not in lm.model.tied_keys}
        if rope.rope_type(c.rope_scaling) == "llama3":
            # llama.cpp divides each frequency by its factor: the factors are plain over scaled.
            plain = rope.inv_frequencies(c.head_dim, c.rope_theta, None)
            writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                              (plain / lm.model.inv_freq.cpu()).numpy().astype(np.float32))
        for key, tensor in state.items():
            new = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ParleyError(f"tensor {key!r} has no GGUF name for {c.model_type}: export-model cannot write it")
            if permuted and key.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = permute(tensor, c.num_attention_heads)
            elif permuted and key.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = permute(tensor, c.num_key_value_heads)
            data = tensor.float().contiguous().numpy()
            kind = qtype
            if data.ndim <= 1 or new.endswith("_norm.weight"):   # what llama.cpp's kernels expect
                kind = gguf.GGMLQuantizationType.F32
            writer.add_tensor(new, gguf.quants.quantize(data, kind), raw_dtype=kind)


def _pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or a one-line refusal (see the module docstring)."""
    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ParleyError(f"{model_dir / 'tokenizer.json'} cannot be read ({e}): re-save the tokenizer") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "Metaspace" in json.dumps(spec.get("pre_tokenizer")):
        raise ParleyError(f"{model_dir}: only byte-level BPE tokenizers can be written to GGUF yet, and this one is a "
                          f"{'SentencePiece-style (byte-fallback)' if model.get('byte_fallback') else model.get('type')} "
                          "tokenizer: use llama.cpp's convert_hf_to_gguf.py for this model")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True) \
            and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex", True):
        name = PRE_TOKENIZERS.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise ParleyError(f"{model_dir}: its tokenizer's pre-tokenizer is not one llama.cpp knows by name (GPT-2's, "
                      "Llama 3's or Qwen2's), so llama.cpp would split text differently: this model cannot be "
                      "written to GGUF")


def _stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the checkpoint's matrices are stored in (the default file type follows it, as in the converter)."""
    from safetensors import safe_open

    from engine.checkpoint import weight_files
    kinds = {"BF16": torch.bfloat16, "F16": torch.float16}
    with safe_open(weight_files(model_dir)[0], framework="pt", device="cpu") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            if len(piece.get_shape()) >= 2:
                return kinds.get(piece.get_dtype(), torch.float32)
    return torch.float32


def _model_name(model_dir: Path) -> str:
    # A Hub cache snapshot is .../models--org--name/snapshots/<hash>: its name is the repository's.
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):
        return model_dir.parent.parent.name.split("--")[-1]
    return model_dir.resolve().name
