"""The CPU decoding path: oneDNN products on packed weights and the plain attention step.

Each must give a row the same bits whatever else is in its batch (so a candidate's tokens do not
depend on the candidates beside it), agree with the reference ops, and follow the weights when
they change."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import torch_threads

from engine.models.attention import attention
from engine.models.linear import Linear, fused_linear


@pytest.fixture(autouse=True)
def two_threads():
    # batch-variance comes from sharing work between threads, so test with more than one
    with torch_threads(2):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 96), (768, 3072), (320, 64)])
def test_a_row_gets_the_same_bits_in_any_batch(dtype, shape):
    torch.manual_seed(0)
    layer = Linear(shape[1], shape[0]).to(dtype)
    x = torch.randn(16, shape[1], dtype=dtype)
    with torch.no_grad():
        alone = [layer(x[i:i + 1]) for i in range(16)]
        for rows in range(2, 17):
            batch = layer(x[:rows])
            for i in range(rows):
                assert torch.equal(batch[i], alone[i][0]), (rows, i)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(layer(x[:3]), F.linear(x[:3], layer.weight, layer.bias),
                                   atol=tolerance * 10, rtol=tolerance)


def test_layers_that_share_an_input_run_as_one_product():
    torch.manual_seed(0)
    q, k, v = Linear(32, 48), Linear(32, 16), Linear(32, 16)
    x = torch.randn(3, 1, 32)
    with torch.no_grad():
        together = fused_linear(x, q, k, v).split([48, 16, 16], dim=-1)
        for layer, out in zip((q, k, v), together):
            torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))


def test_the_packed_copy_follows_the_weights():
    torch.manual_seed(0)
    layer = Linear(32, 32)
    x = torch.randn(1, 32)
    with torch.no_grad():
        layer(x)
    # an optimizer step changes the weights in place
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(4, 32)).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.load_state_dict({"weight": torch.randn(32, 32), "bias": torch.zeros(32)})
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.to(torch.bfloat16)
        torch.testing.assert_close(layer(x.bfloat16()), F.linear(x.bfloat16(), layer.weight, layer.bias))


def test_a_model_with_packed_weights_can_be_deep_copied():
    layer = Linear(16, 16)
    with torch.no_grad():
        layer(torch.randn(1, 16))
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.zero_()
        assert torch.equal(twin(torch.randn(1, 16)), twin.bias.expand(1, -1))
        assert layer.weight.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3)])
@pytest.mark.parametrize("L", [61, 100])   # lengths where SDPA's CPU kernel is not batch-invariant
def test_decoding_attention_is_batch_invariant_and_equals_sdpa(dtype, heads, kv_heads, L):
    torch.manual_seed(0)
    B, D = 8, 16
    q, k, v = torch.randn(B, heads, 1, D, dtype=dtype), torch.randn(B, kv_heads, L, D, dtype=dtype), \
        torch.randn(B, kv_heads, L, D, dtype=dtype)
    mask = torch.rand(B, 1, 1, L) > 0.3
    mask[..., -1] = True
    with torch.no_grad():
        for m in (None, mask):
            full = attention(q, k, v, m)
            for rows in (1, 3, 5):
                part = attention(q[B - rows:].clone(), k[B - rows:].clone(), v[B - rows:].clone(),
                                 None if m is None else m[B - rows:])
                assert torch.equal(part, full[B - rows:])
            reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m,
                                                       enable_gqa=heads != kv_heads).transpose(1, 2).reshape(B, 1, -1)
            tolerance = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(full.float(), reference, atol=tolerance, rtol=tolerance)


def test_without_onednn_the_plain_product_runs(monkeypatch):
    from engine.models import linear
    monkeypatch.setattr(linear, "_onednn_dtypes", set())   # what _probe_onednn finds on a CPU without it
    layer, x = Linear(16, 8), torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer.packed.weight is None


def test_the_probe_finds_onednn_here_and_leaves_the_random_stream_alone():
    from engine.models import linear
    torch.manual_seed(7)
    found = linear._probe_onednn()
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))
    assert torch.float32 in found   # CI's x86 CPU runs the packed path


# -- the private oneDNN ops of engine/models/linear.py -----------------------------------------------
# torch.ops.mkldnn._reorder_linear_weight, _linear_pointwise and _is_mkldnn_bf16_supported are not
# public API: any torch release may rename them or change their arguments. linear.py's probe would
# then find no working dtype and quietly fall back to F.linear (decoding slower, and batch-variant
# again), so this test is where such a change shows. The ops were checked, as linear.py calls them, on:
MKLDNN_CHECKED_ON = ("2.13.0",)


def _onednn_failure(what: str, error) -> str:
    return (f"torch {torch.__version__}: {what} ({error}). engine/models/linear.py's private torch.ops.mkldnn "
            f"calls were checked on torch {', '.join(MKLDNN_CHECKED_ON)}; look up how torch.compile's CPU "
            "backend calls them in this release and update linear.py")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN decodes with F.linear")
@pytest.mark.parametrize("bias", [False, True])
def test_the_private_onednn_ops_work_as_linear_py_calls_them(bias):
    from engine.models import linear
    try:
        bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError) as e:
        pytest.fail(_onednn_failure("torch.ops.mkldnn._is_mkldnn_bf16_supported() failed", e))
    assert isinstance(bf16, bool), _onednn_failure("_is_mkldnn_bf16_supported() is not a bool", type(bf16))
    torch.manual_seed(0)
    for dtype in [torch.float32] + ([torch.bfloat16] if bf16 else []):
        w, b = torch.randn(48, 32, dtype=dtype), (torch.randn(48, dtype=dtype) if bias else None)
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, linear.MIN_ROWS)
        except (AttributeError, RuntimeError, NotImplementedError, TypeError) as e:
            pytest.fail(_onednn_failure(f"_reorder_linear_weight(weight, {linear.MIN_ROWS}) failed for {dtype}", e))
        # the inputs fused_linear gives it: 4 to 16 rows, a lone row expanded to 4, rows of a [batch, time] input
        x = torch.randn(16, 32, dtype=dtype)
        inputs = [x[:rows] for rows in range(linear.MIN_ROWS, linear.MAX_ROWS + 1)]
        inputs += [x[:1].expand(linear.MIN_ROWS, -1), x[:12].reshape(3, 4, 32)]
        tolerance = 1e-5 if dtype == torch.float32 else 3e-2
        for rows in inputs:
            try:
                y = torch.ops.mkldnn._linear_pointwise(rows, packed, b, "none", [], "")
            except (AttributeError, RuntimeError, NotImplementedError, TypeError) as e:
                pytest.fail(_onednn_failure(f"_linear_pointwise on {tuple(rows.shape)} {dtype} rows failed", e))
            expected = F.linear(rows, w, b).float()
            if y.shape != expected.shape:
                pytest.fail(_onednn_failure(f"_linear_pointwise on {tuple(rows.shape)} rows gave {tuple(y.shape)}",
                                            f"F.linear gives {tuple(expected.shape)}"))
            if not torch.allclose(y.float(), expected, atol=tolerance * 10, rtol=tolerance):
                gap = (y.float() - expected).abs().max().item()
                pytest.fail(_onednn_failure(f"_linear_pointwise on {tuple(rows.shape)} {dtype} rows disagrees "
                                            "with F.linear", f"largest difference {gap:.3g}"))
    found = linear._probe_onednn()
    assert found == ({torch.float32, torch.bfloat16} if bf16 else {torch.float32}), _onednn_failure(
        "linear.py's probe does not find the packed product working for every dtype oneDNN runs here", found)
