"""Decoding speed: Parley against transformers.generate on the same random weights, in one run.

    python benchmarks/bench_generate.py [--device cpu|cuda] [--new-tokens 64] [--repeats 5]

For GPT-2-124M and SmolLM2-135M shapes it prints, for float32 and bfloat16:
  - decode tokens/s at batch 1 of Parley and of transformers, and their ratio;
  - the time of a 4-candidate side-by-side run divided by a 1-candidate run (Parley);
  - the fraction of the memory-bandwidth limit Parley reaches: weight bytes read per token x
    tokens/s / the copy bandwidth measured here (bytes read + written per second);
  - ATen operations per decoding step of each (counted once, after the timings): on the CPU a
    thin model's step is as much per-operation overhead as weight reading.
Decode rate = (N - 1) / (time for N new tokens - time for 1), so prefill cancels out for both.
Every timed run takes turns with the others (best of --repeats each), so that a slow spell of a
shared machine slows Parley and transformers alike.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine  # noqa: E402
from engine.generate import generate  # noqa: E402
from engine.settings import Settings  # noqa: E402

SHAPES = {
    "gpt2-124M": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "smollm2-135M": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=2048),
}


def build(shape: dict, path: Path):
    """Random weights in this shape, saved with a word-level tokenizer that covers the whole vocabulary."""
    shape = dict(shape)
    model_type, vocab = shape.pop("model_type"), shape["vocab_size"]
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=f"t{vocab - 1}").save_pretrained(path)
    config = AutoConfig.for_model(model_type, eos_token_id=vocab - 1, bos_token_id=0, **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def interleaved_best(fns: dict, repeats: int) -> dict:
    """Best time of each function, run in turns so that a slow spell of a shared machine hits all."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations run under it: on the CPU each costs a few microseconds whatever
    its size, which is half of a thin model's decoding step."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(run, n: int) -> float:
    """Operations per decoding step, (ops for n new tokens - ops for 1) / (n - 1), as for the rate."""
    counts = []
    for k in (n, 1):
        with OpCounter() as counter:
            run(k)
        counts.append(counter.count)
    return (counts[0] - counts[1]) / (n - 1)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device copy."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def copy():
        for _ in range(5):
            dst.copy_(src)
        sync()
    return 5 * 2 * src.numel() * src.element_size() / interleaved_best({"copy": copy}, 5)["copy"]


def bench(name: str, path: Path, dtype: str, device, n: int, repeats: int, bandwidth: float) -> dict:
    lm = engine.load(path, device=device, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=lm.dtype).to(device).eval()
    prompt = torch.randint(1, lm.tokenizer.vocab_size - 1, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def parley(k, candidates=1):
        # min_new_tokens keeps EOS out, so every run makes exactly k tokens
        s = Settings(temperature=0, max_new_tokens=k, min_new_tokens=k)
        generate(lm, prompt, [s] * candidates, top_alternatives=0)
        sync()

    def transformers(k):
        with torch.no_grad():
            ref.generate(torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=k,
                         min_new_tokens=k, pad_token_id=0)
        sync()

    # decode rate = (n - 1) / (time for n new tokens - time for 1): the prefill cancels out
    t = interleaved_best({"ours": lambda: parley(n), "ours_1": lambda: parley(1), "four": lambda: parley(n, 4),
                          "theirs": lambda: transformers(n), "theirs_1": lambda: transformers(1)}, repeats)
    ours, theirs = (n - 1) / (t["ours"] - t["ours_1"]), (n - 1) / (t["theirs"] - t["theirs_1"])
    one, four = t["ours"], t["four"]
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    return dict(model=name, dtype=dtype, parley=ours, transformers=theirs, speedup=ours / theirs,
                side_by_side=four / one, bandwidth_fraction=weight_bytes * ours / bandwidth,
                ops=(ops_per_step(parley, n), ops_per_step(transformers, n)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    print(f"device {device} ({torch.get_num_threads()} threads), copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"{args.new_tokens} new tokens after a 32-token prompt, best of {args.repeats}")
    header = (f"{'model':<14}{'dtype':<10}{'parley tok/s':>13}{'hf tok/s':>10}{'speedup':>9}{'4 vs 1':>8}{'of BW':>7}"
              f"{'ops/step parley, hf':>21}")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = Path(tmp) / name
            build(SHAPES[name], path)
            for dtype in args.dtypes:
                r = bench(name, path, dtype, device, args.new_tokens, args.repeats, bandwidth)
                print(f"{r['model']:<14}{r['dtype']:<10}{r['parley']:>13.1f}{r['transformers']:>10.1f}"
                      f"{r['speedup']:>8.2f}x{r['side_by_side']:>7.2f}x{r['bandwidth_fraction']:>6.0%}"
                      f"{r['ops'][0]:>13.0f}, {r['ops'][1]:.0f}", flush=True)


if __name__ == "__main__":
    main()
