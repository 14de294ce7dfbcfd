"""`parley train tokenizer`: a byte-level BPE with ChatML special tokens, trained on a corpus."""
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine import data
from engine.errors import ParleyError
from engine.files import output_dir
from engine.tokenizer import Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def stop_ids(tokenizer) -> list[int]:
    """The ids that end a reply of a model trained on this tokenizer: end of turn, end of text."""
    return [i for i in (tokenizer.token_id("<|im_end|>"), tokenizer.token_id("<|endoftext|>")) if i is not None]


def texts(examples) -> list[str]:
    """The plain text of training examples: every message's content, or the text line."""
    out = []
    for x in examples:
        if isinstance(x, str):
            out.append(x)
        else:
            out.extend(m["content"] for m in x)
    return out


def train_tokenizer(examples, vocab_size: int) -> Tokenizer:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ParleyError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
                          f"{256 + len(SPECIAL_TOKENS)}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(examples), trainer)
    # Every conversation starts with <|endoftext|>: training, chat and evaluation all see the same start.
    config = {"eos_token": "<|im_end|>", "pad_token": "<|pad|>", "bos_token": "<|endoftext|>", "unk_token": None,
              "chat_template": CHATML, "model_max_length": 1024, "clean_up_tokenization_spaces": False}
    return Tokenizer(tok, config)


def run(c, store=None) -> Tokenizer:
    """`parley train tokenizer` (engine.train.config.TokenizerConfig); nothing goes to the store."""
    train, _ = data.load(c.data)
    tokenizer = train_tokenizer(train, c.vocab_size)
    with output_dir(Path(c.out)) as tmp:
        tokenizer.save(tmp)
    print(f"trained a {tokenizer.vocab_size}-token byte-level BPE on {len(train)} examples; wrote {c.out}")
    return tokenizer
