"""nn.Linear with a decoding path on the CPU that is faster and batch-invariant.

Decoding multiplies one to a few rows by every weight matrix, so its speed is the speed of
reading the weights. On x86 with torch 2.13, F.linear sends float32 to MKL, whose kernels for one
row, two or three rows and four or more round differently (a candidate's tokens would depend on
how many others share its batch) and read the weights at 5-12 GB/s; bfloat16 goes to oneDNN
with the weights in their plain layout, at about 10 GB/s. oneDNN's linear with the weights packed
in its own blocked layout (`torch.ops.mkldnn._linear_pointwise`, what torch.compile uses on the
CPU) reads them at 15-30 GB/s, and gives a row the same bits in any batch of 2 to 16 rows; one
row rounds differently and 2-3 rows run slower than 4, so smaller batches are padded to 4 rows
(a lone candidate's row is widened to four once, before a model's layers: `widen`). Layers that
read the same input (a Llama block's q/k/v, gate/up) run as one product on their stacked
weights: fewer, larger products read faster, and every call costs ~15 us whatever its size.

The packed copy sits beside the weights (a second copy in memory, made on first use) and is made
again whenever a weight changes. tests/test_decoding_kernels.py checks the bits row by row, and
tests/test_generate.py that a candidate gets the same tokens alone and in a batch.

A model loaded only to decode (`engine.load(..., decode_only=True)`, engine/quantize.py) keeps the
packed copy alone: each layer's plain weight is dropped once packed (a meta tensor keeps its shape
and dtype), every product then takes the packed path whatever its rows, and anything that needs
the plain weights (gradients, saving, LoRA) is refused. With `--quantize int8` the decoding form
is int8 rows with a scale per output channel instead, multiplied by torch's own CPU kernel. A
compiled decoding step (`engine.load(..., compile=True)`) cannot trace either form: each of its
products is one opaque op, `decode_product`, that runs this module's eager path, and the compiler
fuses the rest of the step (norms, rotations, residuals, the MLP's gate) around them.
"""
import itertools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ParleyError

MAX_ROWS = 16     # above this (prefill, training) F.linear is as fast
MIN_ROWS = 4      # fewer rows are padded to this many


class PackedWeight:
    """The weights (stacked by rows) and biases of some layers, with weights packed for oneDNN.

    `form` says what the decoding path reads: None, a packed copy beside the plain weights (made
    again when they change); "packed" or "int8", what a model loaded only to decode keeps, its
    plain weights dropped (`drop_plain`, all but the output head) once this is made."""

    def __init__(self):
        self.key, self.weight, self.bias, self.scales = None, None, None, None
        self.form, self.drop_plain = None, False

    def __deepcopy__(self, memo):
        if self.form is not None:
            return self   # fixed for good and only read: a copied model shares it
        return PackedWeight()   # a oneDNN tensor cannot be copied (the RLHF reference models); pack anew

    def get(self, layers) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.form is not None and self.key == "made":
            return self.weight, self.bias
        # An optimizer step or load_state_dict bumps a version; .to() and .data = … move the data.
        # (_parameters, not layer.weight: a module's attribute lookup costs more than all the rest)
        key = [(p.data_ptr(), p._version, p.dtype) for layer in layers for p in layer._parameters.values()
               if p is not None]
        if key != self.key:
            stacked = torch.cat([layer.weight.detach() for layer in layers])
            if self.form == "int8":
                from engine.quantize import quantize_int8
                self.weight, self.scales = quantize_int8(stacked)
            else:
                self.weight = torch.ops.mkldnn._reorder_linear_weight(stacked, MIN_ROWS)
            biases = [layer.bias for layer in layers]
            self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
            self.key = key
            if self.form is not None:
                self.key = "made"
                self.number, self.layers = next(_numbers), tuple(layers)   # for decode_product
                _GROUPS[self.number] = self
                if self.drop_plain:
                    for layer in layers:
                        w = layer.weight
                        layer.weight = nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False)
        return self.weight, self.bias


_onednn_dtypes = None   # the dtypes this machine's oneDNN runs natively, found on first use


def _probe_onednn() -> set:
    """The dtypes for which packed products run here and agree with F.linear: builds for other
    CPUs (ARM, no bfloat16 instructions) may lack the ops or emulate them slowly."""
    if not torch.backends.mkldnn.is_available():
        return set()
    dtypes = {torch.float32}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.add(torch.bfloat16)
    working = set()
    for dtype in dtypes:
        # fixed values, not torch.randn: a probe must not move the global random stream (seeded runs)
        w = ((torch.arange(8 * 16) % 7 - 3) / 4).reshape(8, 16).to(dtype)
        x = ((torch.arange(MIN_ROWS * 16) % 5 - 2) / 2).reshape(MIN_ROWS, 16).to(dtype)
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, MIN_ROWS)
            y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        except (RuntimeError, NotImplementedError):
            continue
        if torch.allclose(y.float(), F.linear(x, w).float(), atol=0.1, rtol=0.05):
            working.add(dtype)
    return working


def _onednn_decodes(x: torch.Tensor, weight_dtype: torch.dtype) -> bool:
    global _onednn_dtypes
    if torch.compiler.is_compiling():
        # torch.compile cannot trace the packed weights (opaque oneDNN tensors, a cache keyed on
        # data pointers): a compiled step of a model that trains takes F.linear, and its compiler
        # picks kernels; a decode-only model's products go in whole as one opaque op (decode_product).
        return False
    if _onednn_dtypes is None:
        with torch.no_grad():
            _onednn_dtypes = _probe_onednn()
    return (x.is_cpu and x.dtype in _onednn_dtypes and x.dtype == weight_dtype
            and x.numel() <= MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled())


# The decoding forms of decode-only models by number, each with its layers: what a compiled step's
# decode_product names (weak: a model let go takes its own with it).
_GROUPS: "weakref.WeakValueDictionary[int, PackedWeight]" = weakref.WeakValueDictionary()
_numbers = itertools.count()


@torch.library.custom_op("parley::decode_product", mutates_args=())
def decode_product(x: torch.Tensor, group: int, out_features: int) -> torch.Tensor:
    """fused_linear of a decode-only model's layer group `group`, run eagerly inside a compiled step:
    the compiler sees one opaque op (it cannot trace the packed or int8 weights) and fuses the
    rest of the step around it."""
    return fused_linear(x, *_GROUPS[group].layers)


@decode_product.register_fake
def _(x, group, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def fused_linear(x: torch.Tensor, *layers: "Linear") -> torch.Tensor:
    """x through layers that all read it, their outputs side by side in the last dimension; on the
    decoding path, as one product."""
    packed = layers[0].packed
    if packed.form is not None and torch.compiler.is_compiling():
        return decode_product(x, packed.number, sum(layer.out_features for layer in layers))
    if packed.form is not None:   # a model loaded only to decode: its decoding form is all it has
        if torch.is_grad_enabled():
            raise ParleyError("this model was loaded only to decode (its plain weights are dropped, engine/quantize.py): "
                              "load it with engine.load(path) to train it or take gradients")
        if packed.form == "int8":
            return _int8_product(x, *packed.get(layers), packed.scales)
    elif not _onednn_decodes(x, layers[0].weight.dtype):
        if len(layers) == 1:
            return F.linear(x, layers[0].weight, layers[0].bias)
        return torch.cat([F.linear(x, layer.weight, layer.bias) for layer in layers], dim=-1)
    weight, bias = packed.get(layers)

    def product(rows):
        return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    rows = x.numel() // x.shape[-1]
    if rows == 1:   # as four alike: oneDNN reads an expanded row in place
        return product(x.expand(MIN_ROWS, *x.shape[1:]))[:1]
    if rows < MIN_ROWS:
        flat = x.reshape(rows, -1)
        return product(torch.cat([flat, flat[:1].expand(MIN_ROWS - rows, -1)]))[:rows].view(*x.shape[:-1], -1)
    return product(x)


def _int8_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor):
    # torch's int8 weight-only kernel reads bfloat16 rows (its float32 kernel is scalar, 10x slower
    # here), so the rows go in as bfloat16 and come back in the model's dtype. Each row is computed
    # alone: the same bits in any batch, and no padding to four rows (widen leaves them single).
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(rows, weight, scales).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], -1)


def widen(x: torch.Tensor, head: "Linear") -> torch.Tensor:
    """A lone decoding row [1, 1, hidden] as MIN_ROWS alike when the products take the oneDNN path
    (the model's output head says which path its layers take: int8 products want one row).

    Carried through a model's layers, the row then reaches every product already padded (instead of
    being padded and cut again at each); attention reads the real rows only (cache.batch)."""
    if x.shape[0] * x.shape[1] == 1 and head.packed.form != "int8" and _onednn_decodes(x, x.dtype):
        return x.expand(MIN_ROWS, -1, -1)
    return x


class Linear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.packed = PackedWeight()   # for the decoding path, of this layer or a group it leads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_linear(x, self)
