"""Tokenizers from tokenizer.json, with their special tokens, chat template and streaming decode."""
import functools
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from engine import chat_template
from engine.checkpoint import read_json
from engine.errors import ParleyError
from engine.files import write_json

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value) -> str | None:
    # tokenizer_config.json writes a special token either as a string or as an AddedToken object.
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict | None = None):
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        self.special_tokens = {name: _token_text(self.config[name]) for name in SPECIAL_TOKEN_NAMES
                               if _token_text(self.config.get(name)) is not None}
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one is for chat
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        self.chat_template: str | None = template

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ParleyError(f"{path} has no tokenizer.json: Parley reads fast-tokenizer files only; "
                              "re-save the tokenizer with transformers' save_pretrained")
        try:
            tokenizer = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception for a malformed file
            raise ParleyError(f"{file} cannot be read ({e}): re-save the tokenizer") from None
        config = read_json(path / "tokenizer_config.json", required=False) or {}
        # Newer transformers keep the template in its own file; it wins over the config's copy.
        if (path / "chat_template.jinja").is_file():
            try:
                config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ParleyError(f"{path / 'chat_template.jinja'} is not UTF-8 text: re-save it") from None
        elif (path / "chat_template.json").is_file():
            config["chat_template"] = read_json(path / "chat_template.json").get("chat_template")
        self = cls(tokenizer, config)
        self.check(path)
        return self

    def check(self, path: Path) -> None:
        """Refuse a tokenizer that cannot carry a conversation.

        The rule: it must have at least two tokens (text, and something to end a reply with), every
        special token that tokenizer_config.json names must be a string, and its end-of-text token,
        where it names one, must be in the vocabulary: without it no reply could ever end by itself.
        """
        if self.vocab_size < 2:
            raise ParleyError(f"{path / 'tokenizer.json'} has {self.vocab_size} token(s): a tokenizer needs at "
                              "least two, one for text and one to end a reply; copy the model's own tokenizer")
        for name in SPECIAL_TOKEN_NAMES:
            value = _token_text(self.config.get(name))
            if value is not None and not isinstance(value, str):
                raise ParleyError(f"{path / 'tokenizer_config.json'}: {name} is {value!r}, but it must be a "
                                  "token string: fix or re-save the tokenizer")
        eos = self.special_tokens.get("eos_token")
        if eos is not None and self.token_id(eos) is None:
            raise ParleyError(f"{path / 'tokenizer_config.json'} names eos_token {eos!r}, which "
                              f"{path / 'tokenizer.json'} does not have: copy the model's own tokenizer files")
        template = self.chat_template
        if template is not None and not isinstance(template, str):
            raise ParleyError(f"{path / 'tokenizer_config.json'}: chat_template must be a string (or a list of "
                              "named templates): fix or re-save the tokenizer")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(path / "tokenizer_config.json", config)

    # -- ids and text --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        """The largest id the tokenizer can produce (ids need not be contiguous)."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("eos_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.special_tokens.get("pad_token"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def piece(self, token_id: int) -> str:
        """A token's own text, special tokens shown (EOS as itself, not as nothing): what the token
        inspector, alternatives and OpenAI's logprobs show. Cached: decoding step after step asks again."""
        pieces = self.__dict__.setdefault("_pieces", {})
        if token_id not in pieces:
            pieces[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return pieces[token_id]

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """Each id's text on its own, special tokens shown (what DRY's sequence breakers are found in)."""
        return self.tokenizer.decode_batch([[i] for i in range(self.max_id + 1)], skip_special_tokens=False)

    # -- chat ----------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ParleyError("this model has no chat template: use a raw prompt (--raw), or add chat_template "
                              "to its tokenizer_config.json")
        return chat_template.render(self.chat_template, messages, add_generation_prompt, self.special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes BOS itself where the model wants one, so the tokenizer must not add another.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces that never split a UTF-8 character.

    A token may hold part of a character (byte-level BPE splits emoji and CJK into bytes) and a
    token's text may depend on its left neighbour (SentencePiece's leading space). tokenizers'
    DecodeStream handles both: it decodes a short window that starts a little before the new token
    and yields the new part once it no longer ends in U+FFFD, the replacement character of an
    incomplete byte sequence. Every tokenizer Parley loads is a tokenizers one (tokenizer.json:
    `parley train tokenizer`'s byte-level BPE, which the n-gram models share, and any Hugging Face
    checkpoint's), so DecodeStream serves them all.

    DecodeStream has no end-of-stream flush, and it gives up (raises "Invalid prefix") when a
    token rewrites text it already yielded, as byte fallback does when a run of byte tokens turns
    out not to be UTF-8. For those two cases `_window_piece` applies the same window rule here, on
    the window this class keeps in step with the library's (`prefix`, `read`).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0    # tokens whose text has been emitted
        self._stream: DecodeStream | None = DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        piece = self._library_piece(token_id) if self._stream is not None else self._window_piece()
        if piece is None:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return piece

    def flush(self) -> str:
        """What is left at the end of a stream (an incomplete character shows as U+FFFD)."""
        piece = self._window_piece(final=True) or ""
        self.prefix = self.read = len(self.ids)
        self._stream = DecodeStream(skip_special_tokens=self.skip)  # a new window, as after any flush
        return piece

    def _library_piece(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self.tokenizer.tokenizer, token_id)
        except Exception as e:  # the Rust library raises a bare Exception
            if "Invalid prefix" not in str(e):
                raise
        # The library's state is stale now; the rest of this stream uses the window rule.
        self._stream = None
        return self._window_piece()

    def _window_piece(self, final: bool = False) -> str | None:
        """The new text of the window past what was emitted, or None while it is not ready."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if final or (len(text) > len(done) and not text.endswith("\ufffd")):
            return text[len(done):]
        return None
