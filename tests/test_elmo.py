"""ELMo: the character CNN, the biLM's two losses against LSTMs written out by hand, which context
each direction sees, the scalar mix by hand, the model protocol (cache, padding, eval), the
tokenizer against word2vec's words, a planted two-sense word, the model directory and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.models.elmo import (
    BOS_CHAR,
    BOW_CHAR,
    EOW_CHAR,
    SPECIALS,
    BiLM,
    BiLMConfig,
    ScalarMix,
    characters,
    reverse_real,
    word_tokenizer,
)
from engine.models.word2vec import words

WORDS = [*SPECIALS, "the", "river", "bank", "money", "café", "ran"]


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors are tiny: threads only wait on each other (and on the other tests' processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bilm(seed: int = 0, vocab: list[str] = WORDS) -> BiLM:
    torch.manual_seed(seed)
    config = BiLMConfig(vocab_size=len(vocab), max_characters=10, char_dim=4, filters=((1, 3), (2, 4), (3, 5)),
                        highway_layers=2, projection_dim=6, hidden_size=7)
    model = BiLM(config)
    model.set_vocabulary(vocab)
    return model.eval()


# -- the token encoder --

def test_characters_mark_each_word():
    assert characters("ab", 6) == [BOW_CHAR, ord("a") + 1, ord("b") + 1, EOW_CHAR, 0, 0]
    assert characters("<s>", 4) == [BOW_CHAR, BOS_CHAR, EOW_CHAR, 0]
    assert characters("café", 6) == [BOW_CHAR, *(b + 1 for b in b"caf"), 0xC3 + 1, EOW_CHAR]  # cut to fit
    assert len(characters("a" * 30, 10)) == 10


def test_char_cnn_by_hand():
    model = tiny_bilm()
    enc = model.encoder
    chars = model.char_table[5]                                          # "bank"
    e = enc.embed.weight[chars]                                          # [max_characters, char_dim]
    pooled = []
    for conv in enc.convs:
        w, b = conv.weight, conv.bias                                    # [n, char_dim, width]
        width = w.shape[-1]
        windows = torch.stack([e[i:i + width].T for i in range(len(chars) - width + 1)])   # [positions, dim, width]
        pooled.append(F.relu((torch.einsum("pdk,ndk->pn", windows, w) + b).max(0).values))
    x = torch.cat(pooled)
    for highway in enc.highways:
        h, g = (highway.weight @ x + highway.bias).chunk(2)
        x = torch.sigmoid(g) * x + (1 - torch.sigmoid(g)) * F.relu(h)
    expected = enc.projection.weight @ x + enc.projection.bias
    torch.testing.assert_close(enc(chars[None, None])[0, 0], expected, rtol=1e-5, atol=1e-6)


# -- the two language models, by hand --

def lstm_by_hand(lstm: torch.nn.LSTM, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The LSTM-with-projection equations, one step at a time: gates i, f, g, o; c = f c + i g;
    h = W_hr (o tanh c)."""
    h = torch.zeros(lstm.proj_size)
    c = torch.zeros(lstm.hidden_size)
    out = []
    for x in xs:
        i, f, g, o = (lstm.weight_ih_l0 @ x + lstm.bias_ih_l0 + lstm.weight_hh_l0 @ h + lstm.bias_hh_l0).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = lstm.weight_hr_l0 @ (torch.sigmoid(o) * torch.tanh(c))
        out.append(h)
    return out


def direction_by_hand(lstms, xs):
    first = lstm_by_hand(lstms[0], xs)
    second = lstm_by_hand(lstms[1], first)
    return [a + b for a, b in zip(first, second)]   # the residual connection


def nll(model, h, target) -> float:
    return -torch.log_softmax(model.lm_head.weight @ h, 0)[target].item()


@torch.no_grad()
def test_losses_against_lstms_by_hand():
    model = tiny_bilm()
    ids = torch.tensor([[1, 3, 5, 4, 2], [1, 6, 5, 2, 0]])
    pad = torch.tensor([[True] * 5, [True] * 4 + [False]])
    fwd, bwd = model.losses(ids, pad_mask=pad)
    f_terms, b_terms = [], []
    for row, length in zip(ids, pad.sum(1).tolist()):
        xs = list(model.encoder(model.char_table[row[:length]]))
        forward = direction_by_hand(model.forward_lstms, xs)
        backward = direction_by_hand(model.backward_lstms, xs[::-1])[::-1]
        f_terms += [nll(model, forward[t], row[t + 1]) for t in range(length - 1)]
        b_terms += [nll(model, backward[t], row[t - 1]) for t in range(1, length)]
    assert fwd.item() == pytest.approx(sum(f_terms) / len(f_terms), rel=1e-5)
    assert bwd.item() == pytest.approx(sum(b_terms) / len(b_terms), rel=1e-5)


@torch.no_grad()
def test_each_direction_sees_only_its_side():
    model = tiny_bilm()
    ids = torch.tensor([[1, 3, 4, 5, 6, 2]])
    changed = ids.clone()
    changed[0, 3] = 7                                                   # the word at position 3
    _, f1, b1 = model.directions(model.char_table[ids])
    _, f2, b2 = model.directions(model.char_table[changed])
    for a, b in zip(f1 + b1, f2 + b2):
        assert not torch.allclose(a[0, 3], b[0, 3])                     # both directions read the word itself
    for a, b in zip(f1, f2):                                            # forward: only what is left of it
        torch.testing.assert_close(a[0, :3], b[0, :3])
        assert all(not torch.allclose(a[0, t], b[0, t]) for t in range(3, 6))
    for a, b in zip(b1, b2):                                            # backward: only what is right of it
        torch.testing.assert_close(a[0, 4:], b[0, 4:])
        assert all(not torch.allclose(a[0, t], b[0, t]) for t in range(4))


@torch.no_grad()
def test_padding_left_or_right_changes_no_state():
    model = tiny_bilm()
    ids = torch.tensor([[1, 3, 5, 6, 2]])
    alone = model.layers(model.char_table[ids])
    for padded, pad, real in ((torch.tensor([[0, 0, 1, 3, 5, 6, 2]]), torch.tensor([[0, 0, 1, 1, 1, 1, 1]]), slice(2, 7)),
                              (torch.tensor([[1, 3, 5, 6, 2, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1, 0, 0]]), slice(0, 5))):
        for a, b in zip(alone, model.layers(model.char_table[padded], pad.bool())):
            torch.testing.assert_close(b[:, real], a, rtol=1e-5, atol=1e-6)


def test_reverse_real_keeps_padding_in_place():
    x = torch.arange(6.0).view(1, 6)
    assert reverse_real(x, torch.tensor([[False, False, True, True, True, True]])).tolist() == [[0, 1, 5, 4, 3, 2]]
    assert reverse_real(x, torch.tensor([[True, True, True, False, True, False]])).tolist() == [[4, 2, 1, 3, 0, 5]]


# -- the scalar mix --

def test_scalar_mix_by_hand():
    layers = [torch.randn(2, 3, 4) for _ in range(3)]
    mix = ScalarMix(3)
    with torch.no_grad():
        mix.weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
        mix.gamma.fill_(1.5)
    e = [math.exp(w) for w in (0.5, -1.0, 2.0)]
    expected = 1.5 * sum(w / sum(e) * h for w, h in zip(e, layers))
    torch.testing.assert_close(mix(layers), expected)
    torch.testing.assert_close(ScalarMix(3)(layers), sum(layers) / 3)   # at the start: the mean


@torch.no_grad()
def test_layers_are_token_duplicated_then_forward_backward():
    model = tiny_bilm()
    ids = torch.tensor([[1, 3, 5, 2]])
    x, forward, backward = model.directions(model.char_table[ids])
    layers = model.layers(model.char_table[ids])
    assert [tuple(h.shape) for h in layers] == [(1, 4, 12)] * 3
    torch.testing.assert_close(layers[0], torch.cat([x, x], -1))
    for j in (1, 2):
        torch.testing.assert_close(layers[j], torch.cat([forward[j - 1], backward[j - 1]], -1))


# -- the model protocol --

@torch.no_grad()
def test_forward_direction_generates_incrementally():
    model = tiny_bilm()
    ids = torch.tensor([[1, 3, 5, 4, 6]])
    full = model(ids)
    _, forward, _ = model.directions(model.char_table[ids])
    torch.testing.assert_close(full, model.lm_head(forward[-1]))
    cache = model.new_cache(1, 8)
    steps = torch.cat([model(ids[:, :2], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(2, 5)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-6)
    assert cache.batch == 1
    cache.select_rows(torch.tensor([0, 0]))
    assert cache.batch == 2


@torch.no_grad()
def test_left_padded_prompts_match_alone():
    model = tiny_bilm()
    batch = torch.tensor([[0, 0, 1, 3], [1, 6, 5, 4]])
    pad = torch.tensor([[False, False, True, True], [True] * 4])
    cache = model.new_cache(2, 8)
    last = model(batch, cache=cache, pad_mask=pad, last_only=True)[:, -1]
    torch.testing.assert_close(last[0], model(batch[:1, 2:])[0, -1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last[1], model(batch[1:])[0, -1], rtol=1e-5, atol=1e-6)
    following = model(torch.tensor([[5], [2]]), cache=cache)[:, -1]
    torch.testing.assert_close(following[0], model(torch.tensor([[1, 3, 5]]))[0, -1], rtol=1e-5, atol=1e-6)


def test_tokenizer_cuts_text_as_word2vec_does():
    vocab = [*SPECIALS, "hello", "don't", "café", "école", "foo’bar", "x", "b"]
    tok = word_tokenizer(vocab)
    text = "Hello, DON'T 42 café_x! foo’bar über ÉCOLE a1b"
    ids = tok.encode(text)
    expected = [vocab.index(w) if w in vocab else 0 for w in words(text)]
    assert ids == expected
    assert tok.decode(ids) == "hello don't café x foo’bar école b"
    assert tok.encode_chat([{"role": "user", "content": "Hello"}]) == [1, 3, 2, 1]   # <s> hello </s> <s>
    assert tok.eos_token_id == 2
