"""A BERT writes a reply by iterative mask filling (engine/bert_fill.py): on a BERT trained on planted
pairs it fills the expected tokens, in the order a plain re-implementation of the rule gives, in
L / per_round rounds, seeded, never touching the prompt; and `parley generate` fills with it."""
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from engine import bert_fill, data
from engine.errors import ParleyError
from engine.models import bert
from engine.settings import Settings
from engine.train.mlm import bert_tokenizer
from engine.train.tokenizer import train_tokenizer

PAIRS = [("red", "cherry"), ("yellow", "banana"), ("green", "lime"), ("purple", "grape"), ("orange", "mango")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BERT trained on rows [CLS] the COLOUR fruit [SEP] is a FRUIT . [SEP]: the reply's
    constant words are easy, its fruit follows from the prompt's colour alone."""
    root = tmp_path_factory.mktemp("fill")
    (root / "fruit.txt").write_text("".join(f"the {c} fruit is a {f} .\n" for c, f in PAIRS * 20))
    train_set, _ = data.load(str(root / "fruit.txt"))
    train_tokenizer(train_set, 420).save(root / "tok")
    tok = bert_tokenizer(str(root / "tok"))
    cls, sep = tok.token_id("[CLS]"), tok.token_id("[SEP]")
    rows = torch.tensor([[cls, *prompt(tok, c), sep, *reply(tok, f), sep] for c, f in PAIRS])
    torch.manual_seed(0)
    model = bert.Bert(bert.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64,
                                      max_position_embeddings=rows.shape[1]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    maskable = torch.ones_like(rows, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False
    for _ in range(300):
        batch = rows.repeat(8, 1)
        inputs, labels = bert.mask_tokens(batch, maskable.repeat(8, 1), tok.token_id("[MASK]"), tok.vocab_size, g,
                                          rate=0.5)
        loss = bert.mlm_loss(model, inputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    (root / "bert").mkdir()
    bert.write(model, tok, root / "bert")
    return bert_fill.load(root / "bert", "cpu"), root


def prompt(tok, colour):
    return tok.encode(f"the {colour} fruit", add_special_tokens=False)


def reply(tok, fruit):
    return tok.encode(f" is a {fruit} .", add_special_tokens=False)


def greedy(length, **kw):
    return Settings(temperature=0, max_new_tokens=length, **kw)


def reference_order(filler, prompt_ids, length):
    """The rule by hand, one position a round: fill the masked position whose top probability is highest."""
    ids = [filler.cls_id, *prompt_ids, filler.sep_id, *[filler.mask_id] * length, filler.sep_id]
    order = []
    with torch.no_grad():
        while filler.mask_id in ids:
            logits = filler.model(torch.tensor([ids]))[0]
            logits[:, filler.banned] = -float("inf")   # [CLS], [SEP], [MASK] and padding are never a reply's
            probs = logits.log_softmax(-1)   # log: confident positions differ by less than float32 sees in p
            masked = [i for i, t in enumerate(ids) if t == filler.mask_id]
            best = max(masked, key=lambda i: probs[i].max().item())
            ids[best] = int(probs[best].argmax())
            order.append((best - len(prompt_ids) - 2, ids[best]))
    return order


def test_greedy_fills_each_planted_fruit_in_the_rules_order(trained):
    filler, _ = trained
    tok = filler.tokenizer
    for colour, fruit in PAIRS:
        ids = prompt(tok, colour)
        events = list(bert_fill.MaskFilling(filler, ids, [greedy(4)]))
        tokens = [e for e in events if isinstance(e, bert_fill.Token)]
        [done] = [e for e in events if isinstance(e, bert_fill.Finished)]
        expected = reply(tok, fruit)
        assert [t.step for t in sorted(tokens, key=lambda t: t.step)] == [0, 1, 2, 3]
        assert done.token_ids == expected and done.text == tok.decode(expected) and done.finish_reason == "length"
        assert [(t.step, t.token_id) for t in tokens] == reference_order(filler, ids, 4)
        assert done.timings["rounds"] == 4
        assert tokens[-1].snapshot == done.text and bert_fill.PLACEHOLDER in tokens[0].snapshot


def test_rounds_are_the_length_over_the_positions_per_round_and_the_prompt_never_changes(trained):
    filler, _ = trained
    tok = filler.tokenizer
    ids = prompt(tok, "green")
    seen = []
    hook = filler.model.register_forward_pre_hook(lambda module, args: seen.append(args[0][0].tolist()))
    try:
        [done] = bert_fill.MaskFilling(filler, ids, [greedy(4)], per_round=2).run()
    finally:
        hook.remove()
    assert done.timings["rounds"] == 2 and len(seen) == 2
    assert done.token_ids == reply(tok, "lime")
    assert all(row[:len(ids) + 2] == [filler.cls_id, *ids, filler.sep_id] and row[-1] == filler.sep_id
               for row in seen)
    [at_once] = bert_fill.MaskFilling(filler, ids, [greedy(4)], per_round=4).run()
    assert at_once.timings["rounds"] == 1


def test_sampling_is_seeded_and_follows_the_settings(trained):
    filler, _ = trained
    ids = prompt(filler.tokenizer, "red")
    hot = Settings(temperature=5.0, top_k=0, top_p=1.0, min_p=0.0, max_new_tokens=4)
    runs = [bert_fill.MaskFilling(filler, ids, [replace(hot, seed=s) for s in (1, 1, 2, 3, 4)]).run()
            for _ in range(2)]
    assert [r.token_ids for r in runs[0]] == [r.token_ids for r in runs[1]]   # the same seeds, the same replies
    assert runs[0][0].token_ids == runs[0][1].token_ids
    assert len({tuple(r.token_ids) for r in runs[0]}) > 1   # at temperature 5 the seeds tell
    # top_k = 1 leaves each position its most likely token: the greedy reply, whatever the seed
    [one] = bert_fill.MaskFilling(filler, ids, [Settings(temperature=5.0, top_k=1, max_new_tokens=4, seed=9)]).run()
    assert one.token_ids == reply(filler.tokenizer, "cherry")


def test_length_is_capped_to_the_context_and_unused_settings_are_named(trained):
    filler, _ = trained
    ids = prompt(filler.tokenizer, "red")
    fill = bert_fill.MaskFilling(filler, ids, [greedy(500)])
    assert fill.settings[0].max_new_tokens == filler.max_context - 3 - len(ids)
    assert bert_fill.note(greedy(4)) == "mask filling (BERT)"
    assert bert_fill.note(greedy(4, repetition_penalty=1.3, num_beams=2)) == \
        "mask filling (BERT); not used: repetition_penalty, num_beams"
    with pytest.raises(ParleyError, match="cannot change while the masks fill"):
        fill.update(0, greedy(4))


def test_cancel_stops_between_rounds(trained):
    filler, _ = trained
    fill = bert_fill.MaskFilling(filler, prompt(filler.tokenizer, "red"), [greedy(4)])
    events = iter(fill)
    first = next(events)
    fill.cancel()
    [done] = [e for e in events if isinstance(e, bert_fill.Finished)]
    assert isinstance(first, bert_fill.Token) and done.finish_reason == "cancelled" and len(done.token_ids) == 1


def test_parley_generate_fills_with_a_bert(trained, tmp_path):
    _, root = trained
    env = {**os.environ, "PARLEY_HOME": str(tmp_path / "home")}
    run = subprocess.run([sys.executable, "-m", "tui_app", "generate", "--model", str(root / "bert"), "--prompt",
                          "the yellow fruit", "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu",
                          "--repetition-penalty", "1.2"], check=False, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "is a banana ."
    assert "mask filling (BERT)" in run.stderr and "not used: repetition_penalty" in run.stderr
