"""`parley export-model --format gguf`: the file llama.cpp reads, checked by reading it back with gguf's
reader (every tensor, the metadata, the vocabulary) and, where llama-cpp-python is installed, by
running it: llama.cpp must tokenize as Parley does and generate the same greedy tokens."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

import engine
from engine.cli import main
from engine.errors import ParleyError
from engine.export_gguf import _pre_tokenizer, export_model, unpermute
from helpers import CONFIGS

gguf = pytest.importorskip("gguf")

# Qwen3 with head_dim * heads != hidden_size, as the released Qwen3 models have: key_length must be written.
CONFIGS.setdefault("qwen3_wide_heads", dict(model_type="qwen3", hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=32, tie_word_embeddings=False))
MODELS = ["llama_gqa_untied", "llama3_tied_scaled", "qwen2", "qwen3_wide_heads"]

# Written out here, not taken from gguf's name map, so that a wrong mapping cannot check itself.
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(key: str) -> str:
    stem, kind = key.rsplit(".", 1)
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}.{kind}"


def export(checkpoints, tmp_path, name, dtype="float32"):
    path = checkpoints(name)[0]
    out = export_model(path, tmp_path / f"{name}.gguf", dtype=dtype)
    return engine.load(path, device="cpu", dtype="float32"), gguf.GGUFReader(out)


def field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return f.contents()
    return f.contents()


def parley_weights(lm):
    return {k: v for k, v in lm.model.state_dict().items() if k not in lm.model.tied_keys}


@pytest.mark.parametrize("name", MODELS)
def test_every_tensor_is_parleys_under_llama_cpp_names(checkpoints, tmp_path, name):
    lm, reader = export(checkpoints, tmp_path, name)
    c = lm.model.config
    tensors = {t.name: t for t in reader.tensors}
    expected = {gguf_name(k): w for k, w in parley_weights(lm).items()}
    if name == "llama3_tied_scaled":
        expected["rope_freqs.weight"] = None
    assert set(tensors) == set(expected)   # and so no output.weight where the embeddings are tied
    assert ("output.weight" in tensors) == (not c.tie_word_embeddings)
    for gname, weight in expected.items():
        if weight is None:
            continue
        got = torch.from_numpy(np.array(tensors[gname].data)).reshape(weight.shape)
        assert tensors[gname].tensor_type == gguf.GGMLQuantizationType.F32, gname
        if c.model_type in ("llama", "mistral") and gname.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = c.num_attention_heads if ".attn_q." in gname else c.num_key_value_heads
            assert not torch.equal(got, weight), f"{gname} is not permuted for llama.cpp's rotation"
            got = unpermute(got, heads)
        assert torch.equal(got, weight), gname


def test_llama3_rope_factors_are_the_converters(checkpoints, tmp_path):
    lm, reader = export(checkpoints, tmp_path, "llama3_tied_scaled")
    s = lm.model.config.rope_scaling
    got = np.array(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data)
    freqs = 1.0 / (500000.0 ** (np.arange(0, 16, 2) / 16))
    want = []
    for f in freqs:   # llama.cpp divides each frequency by its factor
        wavelen = 2 * math.pi / f
        low, high = s["original_max_position_embeddings"] / s["low_freq_factor"], \
            s["original_max_position_embeddings"] / s["high_freq_factor"]
        if wavelen < high:
            want.append(1.0)
        elif wavelen > low:
            want.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / s["factor"] + smooth))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert len(set(np.round(want, 4))) > 1   # scaled and smoothed frequencies both occur


@pytest.mark.parametrize("dtype,kind,torch_dtype", [("float16", "F16", torch.float16),
                                                    ("bfloat16", "BF16", torch.bfloat16)])
def test_matrices_take_the_dtype_asked_and_norms_stay_float32(checkpoints, tmp_path, dtype, kind, torch_dtype):
    lm, reader = export(checkpoints, tmp_path, "qwen2", dtype)
    tensors = {t.name: t for t in reader.tensors}
    for key, weight in parley_weights(lm).items():
        t = tensors[gguf_name(key)]
        if weight.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, key
            assert torch.equal(torch.from_numpy(np.array(t.data)), weight), key
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType[kind], key
        bits = np.array(t.data).reshape(-1).view(np.uint16)
        assert np.array_equal(bits, weight.to(torch_dtype).view(torch.int16).numpy().reshape(-1).view(np.uint16)), key
    assert field(reader, "general.file_type") == {"F16": 1, "BF16": 32}[kind]


def test_default_dtype_follows_the_checkpoint(checkpoints, tmp_path):
    path = checkpoints("qwen2")[0]
    reader = gguf.GGUFReader(export_model(path, tmp_path / "f32.gguf"))   # a float32 checkpoint: f16, as the converter
    assert field(reader, "general.file_type") == 1
    assert {t.tensor_type.name for t in reader.tensors} == {"F16", "F32"}
    engine.load(path, device="cpu", dtype="bfloat16").save(tmp_path / "bf16")
    reader = gguf.GGUFReader(export_model(tmp_path / "bf16", tmp_path / "bf16.gguf"))
    assert field(reader, "general.file_type") == 32
    assert {t.tensor_type.name for t in reader.tensors} == {"BF16", "F32"}


@pytest.mark.parametrize("name,arch", [("llama_gqa_untied", "llama"), ("qwen3_wide_heads", "qwen3")])
def test_metadata_says_what_the_converter_would(checkpoints, tmp_path, name, arch):
    lm, reader = export(checkpoints, tmp_path, name)
    c = lm.model.config
    want = {"general.architecture": arch, "general.type": "model", "general.file_type": 0,
            f"{arch}.block_count": 2, f"{arch}.context_length": c.max_position_embeddings,
            f"{arch}.embedding_length": 64, f"{arch}.feed_forward_length": 96,
            f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2,
            f"{arch}.attention.key_length": c.head_dim, f"{arch}.attention.value_length": c.head_dim,
            f"{arch}.rope.freq_base": c.rope_theta, f"{arch}.vocab_size": c.vocab_size,
            f"{arch}.rope.dimension_count": c.head_dim}
    for key, value in want.items():
        assert field(reader, key) == value, key
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    assert field(reader, "general.name") == checkpoints(name)[0].name
    if name == "qwen3_wide_heads":
        assert c.head_dim * c.num_attention_heads != c.hidden_size


def test_linear_rope_scaling_is_written(checkpoints, tmp_path):
    _, reader = export(checkpoints, tmp_path, "llama_linear")
    assert field(reader, "llama.rope.scaling.type") == "linear"
    assert field(reader, "llama.rope.scaling.factor") == 2.0


def test_vocabulary_special_tokens_and_chat_template(checkpoints, tmp_path):
    lm, reader = export(checkpoints, tmp_path, "qwen2")
    tok = lm.tokenizer
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tok.id_to_token(i) for i in range(lm.model.config.vocab_size)]
    types = field(reader, "tokenizer.ggml.token_type")
    specials = {tok.token_id(t) for t in ("<|im_start|>", "<|im_end|>", "<pad>", "<s>")}
    assert all(types[i] == gguf.TokenType.CONTROL for i in specials)
    assert all(types[i] == gguf.TokenType.NORMAL for i in tok.encode("Hello there"))
    spec = json.loads((checkpoints("qwen2")[0] / "tokenizer.json").read_text())
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m
                                                      for m in spec["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.token_id("<|begin_of_text|>")
    assert field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False   # Parley's tokenizer adds no BOS
    assert field(reader, "tokenizer.chat_template") == tok.chat_template


def test_the_chat_template_parley_uses_wins(checkpoints, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(checkpoints("qwen2")[0], model)
    # Parley reads newer transformers' chat_template.jinja first; gguf's SpecialVocab, the config's copy first.
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'the config' }}"}))
    (model / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    reader = gguf.GGUFReader(export_model(model, tmp_path / "m.gguf"))
    assert field(reader, "tokenizer.chat_template") == "{{ messages[0]['content'] }}"


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def split_then_bytes(regex):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}


@pytest.mark.parametrize("pre,name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    (split_then_bytes(LLAMA3_SPLIT), "llama-bpe"),
    (split_then_bytes(LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")), "qwen2"),
    (split_then_bytes(r"\p{L}+|\s+"), None),
    ({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, None),
])
def test_pre_tokenizer_is_named_from_tokenizer_json_or_refused(tmp_path, pre, name):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}, "pre_tokenizer": pre}))
    if name is None:
        with pytest.raises(ParleyError, match="pre-tokenizer is not one llama.cpp knows"):
            _pre_tokenizer(tmp_path)
    else:
        assert _pre_tokenizer(tmp_path) == name


def test_a_sentencepiece_style_tokenizer_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "byte_fallback": True},
                                                         "pre_tokenizer": {"type": "Metaspace"}}))
    with pytest.raises(ParleyError, match="SentencePiece-style"):
        _pre_tokenizer(tmp_path)


def run(capsys, *args):
    capsys.readouterr()   # what building the checkpoints printed
    code = main(["export-model", *map(str, args)])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("name,message", [("gpt2", "does not support model_type 'gpt2'"),
                                          ("mistral", "sliding_window 5 cannot be written")])
def test_what_llama_cpp_would_run_differently_is_refused_in_one_line(checkpoints, tmp_path, capsys, name, message):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"kept")
    code, err = run(capsys, checkpoints(name)[0], out)
    assert code == 1 and message in err and err.count("\n") == 1
    assert out.read_bytes() == b"kept" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_bad_paths_are_refused_in_one_line(checkpoints, tmp_path, capsys):
    model = checkpoints("qwen2")[0]
    for args, message in [((tmp_path / "none", tmp_path / "m.gguf"), "does not exist"),
                          ((model, tmp_path), "is a folder"),
                          ((model, tmp_path / "missing" / "m.gguf"), "does not exist")]:
        code, err = run(capsys, *args)
        assert code == 1 and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_whole(checkpoints, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    code, err = run(capsys, checkpoints("qwen2")[0], out, "--outtype", "float32")
    assert code == 0 and f"wrote {out}" in err
    assert field(gguf.GGUFReader(out), "general.file_type") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]   # no temporary file left


# -- llama.cpp itself ---------------------------------------------------------------------------------

def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (it builds llama.cpp from source)")
    return llama_cpp


@pytest.mark.parametrize("name", MODELS)
def test_llama_cpp_tokenizes_and_generates_as_parley_does(checkpoints, tmp_path, name):
    Llama = llama_cpp().Llama
    lm, _ = export(checkpoints, tmp_path, name)
    ll = Llama(str(tmp_path / f"{name}.gguf"), n_ctx=128, n_threads=1, verbose=False)
    text = "Hello there! How are you doing today? 12345 quotes \"here\"."
    ids = lm.tokenizer.encode(text)
    assert ll.tokenize(text.encode(), add_bos=True, special=False) == ids
    chat = lm.tokenizer.render_chat([{"role": "user", "content": "What is your favourite book?"}])
    assert ll.tokenize(chat.encode(), add_bos=False, special=True) == lm.tokenizer.encode_chat(
        [{"role": "user", "content": "What is your favourite book?"}])
    assert ll.metadata["tokenizer.chat_template"] == lm.tokenizer.chat_template

    prompt = lm.tokenizer.encode_chat([{"role": "user", "content": "Hello there!"}])
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            seq.append(int(lm.logits(torch.tensor([seq]))[0, -1].argmax()))
    got = []
    for token in ll.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(token)
        if len(got) == 16 or token == ll.token_eos():
            break
    assert got == seq[len(prompt):len(prompt) + len(got)] and len(got) >= 8
