"""`parley train ngram`: count an n-gram model over a tokenizer's ids of the training split."""
from engine import data
from engine.errors import ParleyError
from engine.lm import LM
from engine.models.ngram import NGramLM, NGramNetwork
from engine.tokenizer import Tokenizer
from engine.train.tokenizer import stop_ids


def train_ngram(tokenizer_dir: str, source: str | None, order: int, method: str, k: float = 1.0) -> LM:
    if not tokenizer_dir:
        raise ParleyError("an n-gram model needs --tokenizer DIR: the neural models' tokenizer, to compare fairly")
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    train, _ = data.load(source)
    bos = tokenizer.token_id(tokenizer.special_tokens.get("bos_token"))
    bos = bos if bos is not None else tokenizer.eos_token_id
    ngram = NGramLM(order, tokenizer.vocab_size, bos, method, k).fit(data.encode(tokenizer, x)[0] for x in train)
    return LM(NGramNetwork(ngram), tokenizer, ngram.config(), {"eos_token_id": stop_ids(tokenizer)})


def run(c, store=None) -> LM:
    """`parley train ngram` (engine.train.config.NGramConfig); nothing goes to the store."""
    lm = train_ngram(c.tokenizer, c.data, c.order, c.smoothing, c.k)
    lm.save(c.out)
    sizes = ", ".join(f"{len(keys)} {n + 1}-grams" for n, keys in enumerate(lm.model.ngram.keys))
    print(f"counted {sizes}; wrote {c.out}")
    return lm
