"""The decoding step captured once as a CUDA graph and replayed at every step (after gpt-fast).

On a GPU a thin model's step is mostly the CPU launching kernels: ~1,500 for SmolLM2-135M, each
a few microseconds to launch and less to run. A CUDA graph records the step's kernels once and
then launches them all in one call. A graph replays the same shapes at the same addresses, so:
- attention reads the cache's every slot, those not yet filled masked out (KVCache.decode_slot's
  fixed view), and the cache's tensors stay where they are from step to step;
- a batch's rows come in buckets (1, 2, 4, 8, ...): the cache pads them to their bucket with
  copies of the first row, whose logits are dropped. Rows that finish run on, ignored, until the
  live ones fit a smaller bucket; then the cache shrinks to it and the step is captured again;
- the new ids are copied into the graph's own input tensor and the logits read from its output.
Whenever the cache's tensors move (a new bucket, a cancelled candidate's row dropped) the step
is captured anew: one eager step, which is also the warm-up capturing needs, then the capture.

Hand-written rather than torch.compile(mode="reduce-overhead"): its CUDA graphs skip a step that
writes into its inputs, and every step writes the KV cache in place. `StaticStep(..., capture=False)`
runs the same buffers and buckets with no graph: on the CPU, what the tests check (tests/test_graphs.py)
and what a compiled step runs in (`engine.load(..., compile=True)`: torch.compile with dynamic shapes,
so one graph serves every width and row count, but one row's, which it specialises).
"""
import warnings

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)   # engine.generate.MAX_ROWS is the last


def bucket(rows: int) -> int:
    """The smallest bucket that holds `rows` rows."""
    return next(b for b in BUCKETS if b >= rows)


def padded(rows: torch.Tensor) -> torch.Tensor:
    """Row indices [n] and copies of the first, to fill their bucket."""
    extra = bucket(len(rows)) - len(rows) if len(rows) else 0
    return torch.cat([rows, rows[:1].expand(extra)]) if extra else rows


class StaticStep:
    """`step(model, ids [rows, 1], decode slot)` (engine.generate.decode_step) on a KV cache whose rows
    fill a bucket, captured as a CUDA graph per cache (see the module docstring)."""

    def __init__(self, model, step, capture: bool = True, eager=None):
        """`step` may be compiled (engine.load(..., compile=True)); should it fail to compile, `eager`
        (the same function uncompiled) takes its place, with a warning."""
        self.model, self.step, self.capture, self.eager = model, step, capture, eager
        self.key = None      # the cache (keys' address, rows, width) the graph holds
        self.graph = self.ids = self.logits = None
        self.captures = 0    # how many caches the step was captured (or, without capture, set up) for

    def __call__(self, cache, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits [len(ids), vocab] after `ids` [n], one per row of the cache's first n."""
        n = len(ids)
        slot = cache.decode_slot(cache.max_len)   # one width for every step: one shape
        key = (cache.k.data_ptr(), cache.batch, cache.max_len)
        if key != self.key:
            return self._start(cache, slot, ids, key)[:n]
        self.ids[:n, 0].copy_(ids)   # the padding rows keep the ids they had: their logits are dropped
        if self.graph is None:
            self.logits = self.step(self.model, self.ids, slot)
        else:
            self.graph.replay()
        # a copy: the next replay writes the graph's output tensor again
        return self.logits[:n].clone()

    def _start(self, cache, slot, ids: torch.Tensor, key) -> torch.Tensor:
        """This step's logits for a cache the step has not run on, and its graph for the next steps."""
        self.graph, self.key = None, key   # the old graph's memory goes with it
        self.captures += 1
        self.ids = ids[:1, None].repeat(cache.batch, 1)
        self.ids[:len(ids), 0] = ids
        if not self.capture:
            self.logits = self._first_step(slot)
            return self.logits
        # The real step, eagerly, on a side stream: the warm-up capturing needs (cuBLAS workspaces,
        # lazily loaded kernels) and, as a capture only records, the one step that runs this time.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._first_step(slot)
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: the app's other workers may use the GPU meanwhile (a reward model scoring)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits = self.step(self.model, self.ids, slot)
            self.graph = graph
        except RuntimeError as e:   # an operation that cannot be captured: decode eagerly from here on
            warnings.warn(f"the decoding step could not be captured as a CUDA graph ({e}); decoding without one")
            self.capture = False
        return logits

    def _first_step(self, slot) -> torch.Tensor:
        """The step on a new shape, where a compiled step compiles: should that fail (no C++ compiler,
        an operation the compiler lacks), before the step wrote anything, the eager step takes over."""
        if self.eager is None or self.step is self.eager:
            return self.step(self.model, self.ids, slot)
        try:
            return self.step(self.model, self.ids, slot)
        except Exception as e:   # the compiler's errors have no common base class
            warnings.warn(f"the decoding step could not be compiled ({type(e).__name__}: {e}); "
                          "decoding without torch.compile")
            self.step = self.eager
            return self.step(self.model, self.ids, slot)
