"""Chat templates render as transformers renders them; streaming decode never splits a character."""
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, processors

from engine import ParleyError, chat_template
from engine.tokenizer import Tokenizer
from helpers import CHATML, CORPUS, GEMMA, LLAMA3, QWEN3, ZEPHYR, hf_tokenizer

TEMPLATES = {
    "chatml": (CHATML, "<|begin_of_text|>", "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "zephyr": (ZEPHYR, "<s>", "</s>"),
    "gemma": (GEMMA, "<s>", "</s>"),
    "qwen3": (QWEN3, "<|begin_of_text|>", "<|im_end|>"),
}
CONVERSATION = [
    {"role": "user", "content": "Hi! How are you?"},
    {"role": "assistant", "content": "<think>\nBe polite.</think>\n  Fine, thanks. And you?  "},
    {"role": "user", "content": "Tell me about the sea 🌊 and 海."},
]
SYSTEM = {"role": "system", "content": "You are a terse pirate."}


@pytest.fixture(params=list(TEMPLATES))
def both(request, tmp_path):
    """The same tokenizer as transformers sees it and as Parley loads it from disk."""
    template, bos, eos = TEMPLATES[request.param]
    ref = hf_tokenizer(template, bos=bos, eos=eos)
    # A post-processor that adds BOS, as Llama's tokenizer.json has: chat prompts must not get two.
    ref.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, ref.convert_tokens_to_ids(bos))])
    ref.save_pretrained(tmp_path)
    return ref, Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_matches_transformers(both, system, generation_prompt):
    ref, ours = both
    messages = ([SYSTEM] if system else []) + CONVERSATION
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.render_chat(messages, add_generation_prompt=generation_prompt) == expected
    ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                  return_dict=False)
    assert ours.encode_chat(messages, add_generation_prompt=generation_prompt) == ids


# The chat templates the families Parley loads ship with, as their model repositories have them
# (tokenizer_config.json's chat_template): Qwen/Qwen3-0.6B, google/gemma-2-2b-it, google/gemma-3-4b-it,
# microsoft/Phi-3.5-mini-instruct, HuggingFaceTB/SmolLM3-3B. Each uses something the short shapes above
# do not: namespaces and reverse loops (Qwen3), `| trim` and raise_exception (Gemma), content given as
# a list of parts (Gemma 3), eos_token (Phi-3), strftime_now and transformers' own `{% generation %}`
# tag (SmolLM3).
FAMILY_TEMPLATES = Path(__file__).parent / "templates"
FAMILIES = {"qwen3": ("<|begin_of_text|>", "<|im_end|>"), "gemma2": ("<s>", "</s>"), "gemma3": ("<s>", "</s>"),
            "phi3": ("<s>", "<|endoftext|>"), "smollm3": ("<|begin_of_text|>", "<|im_end|>")}
PARTS = [{"role": "system", "content": [{"type": "text", "text": "You are a terse pirate."}]},
         {"role": "user", "content": [{"type": "text", "text": "  Tell me about "}, {"type": "text", "text": "the sea 🌊."}]}]


@pytest.fixture(params=list(FAMILIES))
def family(request, tmp_path):
    bos, eos = FAMILIES[request.param]
    ref = hf_tokenizer((FAMILY_TEMPLATES / f"{request.param}.jinja").read_text(), bos=bos, eos=eos)
    ref.save_pretrained(tmp_path)
    return request.param, ref, Tokenizer.from_dir(tmp_path)


def reference_render(ref, messages, **kwargs):
    from jinja2.exceptions import TemplateError
    try:
        return ref.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:         # the template's own refusal (Gemma: no system role)
        return ("refused", str(e))


def parley_render(ours, messages, **kwargs):
    try:
        return chat_template.render(ours.chat_template, messages, special_tokens=ours.special_tokens, **kwargs)
    except ParleyError as e:
        assert "refused the conversation" in str(e)
        return ("refused", str(e).split(": ", 1)[1])


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("thinking", [None, False])
def test_family_chat_templates_render_as_transformers_renders_them(family, system, generation_prompt, thinking):
    name, ref, ours = family
    messages = ([SYSTEM] if system else []) + CONVERSATION + [
        {"role": "assistant", "content": "<think>\nAhoy.\n</think>\n\nAye."}, {"role": "user", "content": "More?"}]
    kwargs = {"add_generation_prompt": generation_prompt}
    if thinking is not None:
        kwargs["enable_thinking"] = thinking      # Qwen3 and SmolLM3 read it; the others ignore it
    expected = reference_render(ref, messages, **kwargs)
    assert parley_render(ours, messages, **kwargs) == expected
    if thinking is None and expected[0] != "refused":
        assert ours.render_chat(messages, add_generation_prompt=generation_prompt) == expected
        assert ours.encode_chat(messages, add_generation_prompt=generation_prompt) == ref.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)


def test_family_templates_take_content_as_a_list_of_parts(family):
    name, ref, ours = family
    if name != "gemma3":
        pytest.skip("only Gemma 3's template reads content given as parts")
    assert parley_render(ours, PARTS) == reference_render(ref, PARTS, add_generation_prompt=True)
    # the system text goes before the first user turn, and each part is trimmed on its own
    assert "user\nYou are a terse pirate.\n\nTell me aboutthe sea 🌊.<end_of_turn>" in parley_render(ours, PARTS)


def test_no_double_bos(both):
    ref, ours = both
    bos_id = ours.token_id(ours.special_tokens["bos_token"])
    assert ours.encode("hello")[0] == bos_id  # plain text gets the post-processor's BOS
    ids = ours.encode_chat(CONVERSATION)
    assert ids[:2].count(bos_id) <= 1


def test_template_errors_are_one_line(both):
    _, ours = both
    ours.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ParleyError, match="refused the conversation: Conversation roles must alternate"):
        ours.render_chat(CONVERSATION)
    ours.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(ParleyError, match="syntax error"):
        ours.render_chat(CONVERSATION)


def test_template_sandbox_blocks_python_internals(both):
    _, ours = both
    ours.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ParleyError, match="unsafe"):
        ours.render_chat(CONVERSATION)


def test_tojson_keeps_non_ascii_and_html(both):
    _, ours = both
    ours.chat_template = "{{ messages[0] | tojson }}"
    assert ours.render_chat([{"role": "user", "content": "<b>海</b> & 🌊"}]) == \
        '{"role": "user", "content": "<b>海</b> & 🌊"}'


@pytest.mark.parametrize("text", [
    "Plain ASCII text, nothing special.",
    "Emoji: 🌊🐙🏴‍☠️ and 👩‍👩‍👧‍👦 family, 🙂!",
    "中文和日本語のテキスト、한국어도 있어요。",
    "Mixed: café naïve — “quotes” 🌊 海 end",
])
def test_streaming_decode_equals_full_decode(both, text):
    _, ours = both
    ids = ours.encode(text, add_special_tokens=False)
    stream = ours.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == ours.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_streaming_holds_back_half_a_character(both):
    _, ours = both
    ids = ours.encode("🌊", add_special_tokens=False)
    assert len(ids) > 1  # the byte-level tokenizer splits the emoji into bytes
    stream = ours.stream_decoder()
    assert [stream.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.push(ids[-1]) == "🌊"


# -- streaming over every kind of tokenizer Parley loads ------------------------------------------
def byte_fallback_tokenizer() -> Tokenizer:
    """A SentencePiece-style tokenizer as Llama 2 and Mistral convert to tokenizer.json: letters and
    "▁" for spaces, and any other character spelled as <0xNN> byte tokens (byte fallback)."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?:'"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             **{c: 259 + i for i, c in enumerate("▁" + letters)}}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(tok, {"bos_token": "<s>", "eos_token": "</s>"})


def parley_trained_tokenizer() -> Tokenizer:
    """`parley train tokenizer`'s byte-level BPE (the n-gram models use it too)."""
    from engine.train.tokenizer import train_tokenizer
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(params=["parley-byte-level", "byte-fallback"])
def kind(request):
    return {"parley-byte-level": parley_trained_tokenizer, "byte-fallback": byte_fallback_tokenizer}[request.param]()


def stream_all(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    stream = tokenizer.stream_decoder()
    return [stream.push(i) for i in ids] + [stream.flush()]


@pytest.mark.parametrize("text", ["Hello there! 🌊 and 海, café.", "海🐙", "Plain words only."])
def test_streaming_every_tokenizer_kind(kind, text):
    ids = kind.encode(text, add_special_tokens=False)
    pieces = stream_all(kind, ids)
    assert "".join(pieces) == kind.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_streaming_holds_back_cjk_split_over_byte_tokens(kind):
    ids = kind.encode("a海", add_special_tokens=False)
    stream = kind.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "a海" and pieces[-1].endswith("海")
    assert len(ids) >= 3 and pieces[-3:-1] == ["", ""]  # 海 is three UTF-8 bytes, one token each here


def test_flush_shows_an_unfinished_character():
    tok = byte_fallback_tokenizer()
    ids = tok.encode("a🌊", add_special_tokens=False)[:-1]  # the emoji's last byte never comes
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in ids] == ["a", "", "", ""]
    assert stream.flush() == "\ufffd" * 3  # byte fallback shows each byte of it as U+FFFD
    assert stream.push(tok.token_id("b")) == "b"  # a new window after the flush


def test_streaming_goes_on_after_bytes_that_are_not_utf8():
    """Byte fallback rewrites text already shown when a run of byte tokens turns out not to be
    UTF-8 (tokenizers' DecodeStream raises "Invalid prefix"); the stream goes on with the window
    rule and gives what the hand-written decoder gave before it."""
    tok = byte_fallback_tokenizer()
    byte = {b: tok.token_id(f"<0x{b:02X}>") for b in (0x20, 0xE2, 0xC2, 0xBB)}
    ids = [tok.token_id("a"), byte[0x20], byte[0xE2], byte[0xC2], byte[0xBB], tok.token_id("b"),
           tok.token_id("▁"), tok.token_id("c")]
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in ids] == ["a", " ", "", "", "", "\ufffd\ufffd\ufffdb", " ", "c"]
    assert stream.flush() == "" and stream.ids == ids
