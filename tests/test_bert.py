"""BERT against transformers' BertForMaskedLM on a tiny random checkpoint: the same logits (also
with padding), a save transformers reads back, the same masked-LM loss and pseudo-log-likelihoods;
and BERT's 80/10/10 corruption."""
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from engine import ParleyError
from engine.models import bert
from helpers import hf_tokenizer

MASK = "<|user|>"   # any special token of the test tokenizer stands in for [MASK]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    tok = hf_tokenizer()
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, type_vocab_size=2,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    ref = BertForMaskedLM(config).eval()
    with torch.no_grad():   # random, not one and zero, norms and biases, so that every tensor matters
        for name, p in ref.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    ref.save_pretrained(path)
    tok.save_pretrained(path)
    return path, ref, tok.convert_tokens_to_ids(MASK)


def test_logits_equal_transformers_also_with_padding(checkpoint):
    path, ref, _ = checkpoint
    model, _ = bert.load(path)
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0        # right padding, BERT's convention
    mask[2, 3:] = 0
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        ours = model(ids, mask)
    real = mask.bool()
    assert (ours[real] - expected[real]).abs().max().item() < 1e-4
    # padding changes what the real tokens see: without the mask they differ
    assert (model(ids)[real] - expected[real]).abs().max().item() > 1e-3


def test_write_then_transformers_reads_the_same_model(checkpoint, tmp_path):
    path, ref, _ = checkpoint
    model, tok = bert.load(path)
    (tmp_path / "out").mkdir()
    bert.write(model, tok, tmp_path / "out")
    again = BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (again(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_masked_lm_loss_equals_transformers(checkpoint):
    path, ref, mask_id = checkpoint
    model, _ = bert.load(path)
    ids = torch.randint(5, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(3))
    inputs, labels = bert.mask_tokens(ids, torch.ones_like(ids, dtype=torch.bool), mask_id, model.config.vocab_size,
                                      torch.Generator().manual_seed(4), rate=0.3)
    assert (labels != bert.IGNORE).any()
    with torch.no_grad():
        assert bert.mlm_loss(model, inputs, labels).item() == pytest.approx(
            ref(inputs, labels=labels).loss.item(), abs=1e-5)


def test_pseudo_log_likelihoods_mask_one_position_at_a_time(checkpoint):
    path, ref, mask_id = checkpoint
    model, _ = bert.load(path)
    ids = torch.randint(5, model.config.vocab_size, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    scored = [False] + [True] * 8 + [False]       # [CLS] and [SEP] are not scored
    expected = []
    for i in range(1, 9):
        masked = list(ids)
        masked[i] = mask_id
        with torch.no_grad():
            expected.append(ref(torch.tensor([masked])).logits[0, i].log_softmax(-1)[ids[i]].item())
    ours = bert.pseudo_log_likelihoods(model, ids, scored, mask_id, batch_size=3)   # batches of 3, 3 and 2
    assert ours == pytest.approx(expected, abs=1e-4)
    assert bert.pseudo_perplexity(ours) == pytest.approx(torch.tensor(expected).mean().neg().exp().item(), rel=1e-4)


def test_mask_tokens_chooses_15_percent_and_corrupts_80_10_10():
    n, vocab, mask_id = 200_000, 1000, 3
    ids = torch.randint(10, vocab, (n,), generator=torch.Generator().manual_seed(6))
    maskable = torch.rand(n, generator=torch.Generator().manual_seed(7)) > 0.2   # specials and padding are not
    inputs, labels = bert.mask_tokens(ids, maskable, mask_id, vocab, torch.Generator().manual_seed(8))
    chosen = labels != bert.IGNORE
    assert not chosen[~maskable].any() and torch.equal(inputs[~maskable], ids[~maskable])
    assert torch.equal(labels[chosen], ids[chosen])
    assert chosen[maskable].float().mean().item() == pytest.approx(0.15, abs=0.005)
    masked = (inputs == mask_id)[chosen].float().mean().item()
    kept = (inputs == ids)[chosen].float().mean().item()          # includes random draws of the same id (0.1%)
    replaced = ((inputs != ids) & (inputs != mask_id))[chosen].float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1, abs=0.01) and replaced == pytest.approx(0.1, abs=0.01)
    assert torch.equal(inputs[~chosen], ids[~chosen])
    again = bert.mask_tokens(ids, maskable, mask_id, vocab, torch.Generator().manual_seed(8))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_a_directory_that_is_not_bert_gets_one_line(checkpoint, tmp_path):
    import json
    import shutil
    path, _, _ = checkpoint
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ParleyError, match="model_type is 'gpt2', not 'bert'"):
        bert.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "position_embedding_type": "relative_key"}))
    with pytest.raises(ParleyError, match="relative position embeddings is not supported"):
        bert.load(tmp_path / "m")
