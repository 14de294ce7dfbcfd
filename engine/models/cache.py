"""A static key/value cache for batched, left-padded generation, after gpt-fast.

Every row of a batch is left-padded to the same length, so the newest token of every row sits in
the same slot and one slot index serves the whole batch. What differs per row is which slots hold
padding (`valid`) and how many real tokens came before (`seen`, the next position id).

A prefill writes through `KVCache.step`/`update`, on Python ints. A decoding step writes through
a `DecodeSlot` (`KVCache.decode_slot`), which holds tensors only: the slot index is a tensor, so
a step through it is a pure function of tensors that torch.compile can trace whole.
"""
from dataclasses import dataclass

import torch


def causal_mask(key_valid: torch.Tensor, start: int, rule=None) -> torch.Tensor:
    """Boolean attention mask [batch, 1, queries, keys] for queries in slots start..keys-1.

    `rule(i, j)` (engine.models.patterns) restricts attention further, on token positions: a
    row's positions count its real tokens, so left padding does not shift a pattern."""
    n_keys = key_valid.shape[1]
    q = torch.arange(start, n_keys, device=key_valid.device)[:, None]
    k = torch.arange(n_keys, device=key_valid.device)[None, :]
    mask = (k <= q)[None] & key_valid[:, None, :]
    if rule is not None:
        positions = key_valid.long().cumsum(1) - 1
        mask = mask & rule(positions[:, start:, None], positions[:, None, :])
    # A padding query attends to itself, so that no row of the mask is empty (SDPA would give NaN).
    mask = mask | (k == q)[None]
    return mask[:, None]


def positions_and_mask(pad_mask: torch.Tensor | None, seq_len: int, device, rule=None):
    """Position ids and attention mask for a forward pass without a cache.

    With no padding and dense attention the mask is None, and attention uses SDPA's causal path.
    """
    if pad_mask is None:
        positions = torch.arange(seq_len, device=device)[None]
        if rule is None:
            return positions, None
        pad_mask = torch.ones(1, seq_len, dtype=torch.bool, device=device)
    pad_mask = pad_mask.bool()
    positions = (pad_mask.long().cumsum(1) - 1).clamp(min=0)
    return positions, causal_mask(pad_mask, 0, rule)


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device, rule=None):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        if torch.device(device).type == "cpu":
            # Decoding attention on the CPU runs in float32 (engine/models/attention.py): bfloat16
            # batched products there cost ~4x float32 ones, more than a float32 cache's extra bytes.
            dtype = torch.float32
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = self._layer_views()
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the decoding slot, one tensor for all steps
        self.rule = rule  # the attention pattern, None for dense
        self.length = 0  # slots filled so far, the same for every row
        self.start = 0   # first slot of the tokens now being written
        self.padded = False

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def step(self, n_new: int, pad_mask: torch.Tensor | None = None):
        """Reserve slots for `n_new` tokens per row; return their position ids and attention mask.

        `pad_mask` [batch, n_new] is False at left padding; None means no padding (the usual
        decode step), which lets batch-1 decoding skip the mask altogether.
        """
        start, end = self.length, self.length + n_new
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} were asked for")
        if pad_mask is None:
            pad_mask = torch.ones(self.batch, n_new, dtype=torch.bool, device=self.valid.device)
        else:
            pad_mask = pad_mask.bool()
            self.padded = self.padded or not bool(pad_mask.all())
        self.valid[:, start:end] = pad_mask
        positions = self.seen[:, None] + pad_mask.long().cumsum(1) - 1
        self.seen += pad_mask.sum(1)
        self.start, self.length = start, end
        needs_mask = self.padded or n_new > 1 or self.rule is not None
        mask = causal_mask(self.valid[:, :end], start, self.rule) if needs_mask else None
        return positions.clamp(min=0), mask

    def mask(self, rule) -> torch.Tensor:
        """The attention mask of the tokens `step` reserved, under another pattern than the
        cache's: for models whose layers differ (Gemma's sliding-window and global layers)."""
        return causal_mask(self.valid[:, :self.length], self.start, rule)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's keys and values of one layer; return all keys and values so far."""
        keys, values = self.layers[layer]
        keys.narrow(2, self.start, self.length - self.start).copy_(k)
        values.narrow(2, self.start, self.length - self.start).copy_(v)
        return keys.narrow(2, 0, self.length), values.narrow(2, 0, self.length)

    def decode_slot(self, width: int | None = None) -> "DecodeSlot":
        """Reserve the next slot for one new token per row; return what a decoding step reads and writes.

        Attention reads the first `width` slots. By default those are exactly the filled ones, as
        in a prefill: masked-out slots would still change how attention's sums round, so a row's
        bits would depend on the cache's size. A fixed width keeps every step's shapes alike (one
        compiled graph, CUDA graphs), the slots not yet filled masked out."""
        slot = self.length
        width = slot + 1 if width is None else width
        if not slot < width <= self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; slot {slot} of a {width}-slot view was asked for")
        self.start, self.length = slot, slot + 1
        self.slot.fill_(slot)   # in place: the step reads the slot from a tensor whose address never changes
        return DecodeSlot(self.slot, [(k.narrow(2, 0, width), v.narrow(2, 0, width)) for k, v in self.layers],
                          self.valid.narrow(1, 0, width), self.seen, self.rule,
                          masked=self.padded or self.rule is not None or width > slot + 1)

    def _layer_views(self) -> list:
        """Each layer's (keys, values), as views made once rather than indexed at every step."""
        return [(self.k[layer], self.v[layer]) for layer in range(self.k.shape[0])]

    def select_rows(self, rows: torch.Tensor, in_place: bool = False) -> None:
        """Keep (and repeat or reorder) rows: shares one prefilled prompt among candidates, or follows beams.
        `in_place` (as many rows as now): the tensors stay where they are, for a captured step (engine/graphs.py)."""
        if in_place:
            for t, dim in ((self.k, 1), (self.v, 1), (self.valid, 0), (self.seen, 0)):
                t.copy_(t.index_select(dim, rows))
            return
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        self.layers = self._layer_views()
        self.valid = self.valid.index_select(0, rows)
        self.seen = self.seen.index_select(0, rows)


@dataclass
class DecodeSlot:
    """One decoding step's view of a KVCache, with the interface models call (`batch`, `step`,
    `update`) and no Python number that changes from step to step: all a step writes is these
    tensors, in place. It serves one step: the next decode_slot or select_rows moves the cache on."""
    slot: torch.Tensor      # [1] the slot every row's new token goes to
    layers: list            # each layer's (keys, values) [batch, kv_heads, width, head_dim]
    valid: torch.Tensor     # [batch, width] False at padding and at slots not yet filled
    seen: torch.Tensor      # [batch] real tokens so far: the new token's position id
    rule: object = None     # the attention pattern, None for dense
    masked: bool = True     # False where every slot of the view is a real, earlier token: no mask

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def step(self, n_new: int, pad_mask: torch.Tensor | None = None):
        """The new token's position ids [batch, 1] and attention mask, as KVCache.step gives them."""
        if n_new != 1 or pad_mask is not None:
            raise ValueError("a decoding step takes one token per row and no padding")
        self.valid.index_fill_(1, self.slot, True)
        positions = self.seen[:, None].clone()
        self.seen.add_(1)
        return positions, decode_mask(self.valid, self.slot, self.rule) if self.masked else None

    def mask(self, rule) -> torch.Tensor:
        """The new token's attention mask under another pattern than the cache's (KVCache.mask)."""
        return decode_mask(self.valid, self.slot, rule)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the new token's keys and values of one layer into the slot; return the view's all."""
        keys, values = self.layers[layer]
        keys.index_copy_(2, self.slot, k.to(keys.dtype))   # the CPU cache is float32 (KVCache)
        values.index_copy_(2, self.slot, v.to(values.dtype))
        return keys, values


def decode_mask(valid: torch.Tensor, slot: torch.Tensor, rule=None) -> torch.Tensor:
    """Boolean attention mask [batch, 1, 1, keys] of one new token in `slot` (a tensor [1]).

    No slot after the new token's is filled yet, so the valid slots alone make the mask causal.
    The values are causal_mask's for the same query, so attention gives the same bits."""
    mask = valid[:, None, :]
    if rule is not None:
        positions = valid.long().cumsum(1) - 1
        mask = mask & rule(positions.index_select(1, slot)[:, :, None], positions[:, None, :])
    return mask[:, None]
