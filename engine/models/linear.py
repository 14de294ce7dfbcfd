"""nn.Linear with a decoding path on the CPU that is faster and batch-invariant.

Decoding multiplies one to a few rows by every weight matrix. With torch 2.13's MKL on x86, the
product written as W @ x^T in tiles of two or three rows is 2-3x faster than F.linear's x @ W^T,
and a row's result is then bitwise the same whatever else shares the batch: a candidate's
tokens do not depend on the other candidates beside it (tests/test_generate.py checks this).
Wider tiles switch MKL to kernels that round differently, so wider batches go tile by tile.
bfloat16 and float16 products go through oneDNN, which is already fast and batch-invariant for
these shapes, so they keep F.linear.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

TILE = 3          # rows per product; a lone row is doubled, since MKL treats one row differently
MAX_ROWS = 16     # above this (prefill, training) the plain product is faster


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if (x.device.type != "cpu" or x.dtype != torch.float32 or rows > MAX_ROWS
                or torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, -1)
        tiles = []
        for start in range(0, rows, TILE):
            tile = flat[start:start + TILE]
            n = len(tile)
            if n == 1:
                tile = tile.expand(2, -1).contiguous()
            tiles.append((self.weight @ tile.T)[:, :n])
        y = torch.cat(tiles, dim=1).T if len(tiles) > 1 else tiles[0].T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1)
