"""Which earlier positions a token may attend to: dense causal attention and the sparse patterns
the field tried for long contexts. A pattern is a rule on (query position i, key position j)
applied on top of causality (j <= i); every pattern keeps j = i.

  dense    every earlier position
  local    the last `window` positions: i - j < window (Mistral's sliding window)
  dilated  `window` positions spaced `stride` apart (atrous): (i - j) % stride == 0 and
           i - j < window x stride
  strided  Child et al. 2019, strided: i - j < stride, or (i - j) % stride == 0
  fixed    Child et al. 2019, fixed (c = 1): the same block of `stride` positions
           (j // stride == i // stride), or the last position of any block (j % stride == stride - 1)

Stacked layers reach further than one layer's pattern: two strided or fixed layers connect every
pair of positions, which is why Child et al. can drop the dense attention of long sequences.
"""
from engine.errors import ParleyError

PATTERNS = {
    "dense": None,
    "local": lambda i, j, window, stride: i - j < window,
    "dilated": lambda i, j, window, stride: ((i - j) % stride == 0) & (i - j < window * stride),
    "strided": lambda i, j, window, stride: (i - j < stride) | ((i - j) % stride == 0),
    "fixed": lambda i, j, window, stride: (j // stride == i // stride) | (j % stride == stride - 1),
}
NEEDS = {"local": ("window",), "dilated": ("window", "stride"), "strided": ("stride",), "fixed": ("stride",)}


def rule(name: str, window: int | None = None, stride: int | None = None):
    """A function (i, j) -> allowed on tensors of positions, or None for dense attention."""
    if name not in PATTERNS:
        raise ParleyError(f"config.json: attention_pattern {name!r} is unknown: use one of {', '.join(PATTERNS)}")
    values = {"window": window, "stride": stride}
    for needed in NEEDS.get(name, ()):
        if not isinstance(values[needed], int) or values[needed] < 1:
            raise ParleyError(f"config.json: attention_pattern {name!r} needs attention_{needed}, a positive "
                              f"integer (it is {values[needed]!r})")
    pattern = PATTERNS[name]
    return None if pattern is None else lambda i, j: pattern(i, j, window, stride)
