"""Decoding speed: Parley against transformers.generate on the same random weights, in one run.

    python benchmarks/bench_generate.py [--device cpu|cuda] [--new-tokens 64] [--repeats 5]
                                        [--sections speed memory context gpu]

For GPT-2-124M and SmolLM2-135M shapes (and, on a GPU, a Llama-3.2-1B shape) it prints these tables.

speed, for float32, bfloat16 and (on the CPU) float32 with int8 weights (`--quantize int8`,
against transformers in float32):
  - decode tokens/s at batch 1 of Parley and of transformers, and their ratio, also with Parley's
    decoding step compiled (`-compiled`: torch.compile, its compile time left out of the rates);
  - the time of a 4-candidate side-by-side run divided by a 1-candidate run (Parley);
  - the fraction of the memory-bandwidth limit Parley reaches: weight bytes read per token x
    tokens/s / the copy bandwidth measured here (bytes read + written per second);
  - a step's time split into the weights' reading at that bandwidth and the rest (per-operation
    overhead, attention, sampling), with ATen operations per step of each (counted once, after the
    timings): on the CPU a thin model's step is as much overhead as weight reading.
memory: the peak resident memory of a process while it loads the model and while it decodes (the
  peak is reset between the two), above the same process's memory before loading, each in a fresh
  process; Parley (as `parley generate` loads it: decode-only) against transformers in the same dtype.
context: decode tokens/s with the context already at 128, 512 and 2,048 tokens (and the model's
  maximum), and the time to the first token of a 400-token prompt, Parley against transformers
  (float32); here each run's decoding steps are timed apart from its prefill (Parley's own
  timings, a transformers streamer's timestamps), as a long prompt's prefill would drown them.
gpu (with --device cuda, in bfloat16): decode tokens/s at batch 1 of Parley's captured step (CUDA
  graphs, engine/graphs.py) and its eager loop, against transformers eager and transformers with
  its static cache, which generate compiles (torch.compile, mode "reduce-overhead": the strongest
  setup its docs give), the ratio to the better of the two and the fraction of the GPU's bandwidth;
  then throughput (tokens/s over all rows) at batch 1, 4, 16 and 64, Parley's captured step
  against transformers eager (its static cache would compile again for each batch size). Timed on
  the decoding steps alone, as the context table is.
Decode rate = (N - 1) / (time for N new tokens - time for 1), so prefill cancels out for both.
Every timed run takes turns with the others (best of --repeats each), so that a slow spell of a
shared machine slows Parley and transformers alike.
"""
import argparse
import json
import re
import subprocess
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
from engine.models.linear import Linear  # noqa: E402
from engine.settings import Settings  # noqa: E402

# (label, dtype, quantize): the rows of the speed and memory tables; transformers runs in `dtype`
VARIANTS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None), "int8": ("float32", "int8"),
            "float32-compiled": ("float32", None), "bfloat16-compiled": ("bfloat16", None)}
# `engine.load(..., compile=True)`: the decoding step through torch.compile (speed table only: a fresh
# process per memory figure would compile again)

SHAPES = {
    "gpt2-124M": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "smollm2-135M": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=2048),
    "llama-1B": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=4096),
}
GPU_ONLY = {"llama-1B"}   # 1.2B float32 parameters: minutes a step's worth on a 2-core CPU


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


def bytes_per_token(lm) -> int:
    """Weight bytes a decoding step reads: every parameter once (tied ones once), an int8 layer's
    weights as int8 rows and their bfloat16 scales."""
    int8, total = set(), 0
    for m in lm.model.modules():
        if isinstance(m, Linear) and m.packed.form == "int8":
            total += m.in_features * m.out_features + 2 * m.out_features
            int8.add(id(m._parameters["weight"]))
    return total + sum(p.numel() * p.element_size() for p in lm.model.parameters() if id(p) not in int8)


def runners(lm, ref, device):
    """parley(prompt, k, candidates) and transformers(prompt, k): k new tokens, exactly."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def parley(prompt, k, candidates=1):
        # min_new_tokens keeps EOS out, so every run makes exactly k tokens
        s = Settings(temperature=0, max_new_tokens=k, min_new_tokens=k)
        generate(lm, prompt, [s] * candidates, top_alternatives=0)
        sync()

    def transformers(prompt, k):
        with torch.no_grad():
            ref.generate(torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=k,
                         min_new_tokens=k, pad_token_id=0)
        sync()
    return parley, transformers


def load_pair(path: Path, variant: str, device):
    dtype, quantize = VARIANTS[variant]
    lm = engine.load(path, device=device, dtype=dtype, decode_only=True, quantize=quantize,
                     compile=variant.endswith("-compiled"))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return lm, ref


def random_prompt(lm_or_config, length: int) -> list[int]:
    vocab = getattr(lm_or_config, "vocab_size", None) or lm_or_config.tokenizer.vocab_size
    return torch.randint(1, vocab - 1, (length,), generator=torch.Generator().manual_seed(0)).tolist()


def bench(name: str, path: Path, variant: str, device, n: int, repeats: int, bandwidth: float) -> dict:
    lm, ref = load_pair(path, variant, device)
    parley, transformers = runners(lm, ref, device)
    prompt = random_prompt(lm, 32)
    compile_s = None
    if lm.compiled_step is not None:   # compiled here, for one row and for several, outside the timings
        start = time.perf_counter()
        parley(prompt, n)
        parley(prompt, n, 4)
        compile_s = time.perf_counter() - start
    # decode rate = (n - 1) / (time for n new tokens - time for 1): the prefill cancels out
    t = interleaved_best({"ours": lambda: parley(prompt, n), "ours_1": lambda: parley(prompt, 1),
                          "four": lambda: parley(prompt, n, 4),
                          "theirs": lambda: transformers(prompt, n), "theirs_1": lambda: transformers(prompt, 1)},
                         repeats)
    ours, theirs = (n - 1) / (t["ours"] - t["ours_1"]), (n - 1) / (t["theirs"] - t["theirs_1"])
    weight_bytes = bytes_per_token(lm)
    step, reading = 1 / ours, weight_bytes / bandwidth
    return dict(model=name, variant=variant, parley=ours, transformers=theirs, speedup=ours / theirs,
                side_by_side=t["four"] / t["ours"], bandwidth_fraction=reading / step,
                step_ms=1e3 * step, read_ms=1e3 * reading, compile_s=compile_s,
                # a compiled step's operations run inside its kernels, out of a dispatch mode's sight
                ops=(None if compile_s is not None else ops_per_step(lambda k: parley(prompt, k), n),
                     ops_per_step(lambda k: transformers(prompt, k), n)))


def bench_gpu(name: str, path: Path, device, n: int, repeats: int, bandwidth: float) -> dict:
    """Batch-1 decode rates in bfloat16 on a GPU: Parley captured and eager, transformers eager and
    with its static cache (compiled by its generate); then throughput at each batch size. Timed on the
    decoding steps alone (timed_runs), so every run has one length and transformers compiles once per
    shape. Its static cache would compile again for each batch size: the batch table has it eager."""
    lm, ref = load_pair(path, "bfloat16", device)
    parley, transformers = timed_runs(lm, ref, device)
    prompt = random_prompt(lm, 32)

    def rate(run, rows=1):
        return rows * (n - 1) / best_of(lambda: run(rows), repeats)[1]
    rates = {"captured": rate(lambda r: parley(prompt, n, r)), "eager": rate(lambda r: parley(prompt, n, r, False)),
             "hf": rate(lambda r: transformers(prompt, n, r)),
             "hf_static": rate(lambda r: transformers(prompt, n, r, "static"))}
    batches = {rows: {"parley": rate(lambda r: parley(prompt, n, r), rows),
                      "hf": rate(lambda r: transformers(prompt, n, r), rows)} for rows in (1, 4, 16, 64)}
    return dict(model=name, rate=rates, best_hf=max(rates["hf"], rates["hf_static"]),
                bandwidth_fraction=bytes_per_token(lm) * rates["captured"] / bandwidth, batches=batches)


class Stamps:
    """A transformers streamer that only notes when each put comes: the prompt's, then each new token's."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def timed_runs(lm, ref, device):
    """parley(prompt, k, rows, static) and transformers(prompt, k, rows, cache), each returning
    (seconds to the first new token, seconds for the k - 1 steps after it) for `rows` copies of the
    prompt: decode rates measured on the steps alone, so that a long prompt's prefill and its noise on
    a shared machine stay out of them. `static`: Parley's fixed-shape step (None: its default, a CUDA
    graph on a GPU); `cache="static"`: transformers' static cache, which its generate compiles on a GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def parley(prompt, k, rows=1, static=None):
        s = Settings(temperature=0, max_new_tokens=k, min_new_tokens=k)
        done = generate(lm, prompt, [s] * rows, top_alternatives=0, static=static)
        sync()
        return done[0].timings["prefill_s"], max(r.timings["decode_s"] for r in done)

    def transformers(prompt, k, rows=1, cache=None):
        stamps, start = Stamps(), time.perf_counter()
        with torch.no_grad():
            ref.generate(torch.tensor([prompt] * rows, device=device), do_sample=False, max_new_tokens=k,
                         min_new_tokens=k, pad_token_id=0, streamer=stamps, cache_implementation=cache)
        sync()
        return stamps.times[1] - start, stamps.times[-1] - stamps.times[1]
    return parley, transformers


def best_of(run, repeats: int) -> tuple[float, float]:
    """Each of run()'s two timings at its best over repeats (after one warm-up)."""
    run()
    times = [run() for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


def context_rates(name: str, path: Path, device, n: int, repeats: int) -> dict:
    """Decode tokens/s with the context at each length (prompt of length - n, then n tokens), and
    the time to the first token of a 400-token prompt, in float32."""
    lm, ref = load_pair(path, "float32", device)
    parley, transformers = timed_runs(lm, ref, device)
    lengths = sorted({c for c in (128, 512, 2048) if c <= lm.max_context} | {lm.max_context})
    rows = {}
    for length in lengths:
        prompt = random_prompt(lm, length - n)
        ours, theirs = (best_of(lambda run=run: run(prompt, n), repeats)[1] for run in (parley, transformers))
        rows[length] = ((n - 1) / ours, (n - 1) / theirs)
    prompt = random_prompt(lm, 400)
    ttft = tuple(best_of(lambda run=run: run(prompt, 2), repeats)[0] for run in (parley, transformers))
    return dict(model=name, rates=rows, ttft=ttft)


def peak_memory(impl: str, path: Path, variant: str, device: str, n: int) -> tuple[float, float]:
    """MiB of peak resident memory above the process's own before loading, while loading and while
    decoding, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--child-memory", impl, str(path), variant, device, str(n)],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["load_mib"], result["decode_mib"]


def status_mib(key: str) -> float:
    """VmRSS (resident now) or VmHWM (its peak since the last reset) of this process, in MiB."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_peak() -> None:
    # Linux: writing 5 to clear_refs sets VmHWM back to VmRSS, so each phase has its own peak
    Path("/proc/self/clear_refs").write_text("5")


def child_memory(impl: str, path: str, variant: str, device: str, n: int) -> None:
    """The child of peak_memory: load, decode n tokens; print each phase's peak above the start."""
    device = torch.device(device)
    dtype, quantize = VARIANTS[variant]
    before = status_mib("VmRSS")
    reset_peak()
    if impl == "parley":
        lm = engine.load(path, device=device, dtype=dtype, decode_only=True, quantize=quantize)
        run, prompt = runners(lm, None, device)[0], random_prompt(lm, 32)
    else:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        run, prompt = runners(None, ref, device)[1], random_prompt(ref.config, 32)
    load = status_mib("VmHWM")
    reset_peak()
    run(prompt, n)
    print(json.dumps({"load_mib": load - before, "decode_mib": status_mib("VmHWM") - before}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", choices=list(SHAPES),
                        help="default: all shapes on a GPU, all but the ~1B one on the CPU")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="float32, bfloat16 and int8 (int8 weights, float32 activations; CPU only), and "
                        "float32 and bfloat16 with the decoding step compiled (speed only)")
    parser.add_argument("--sections", nargs="*", choices=["speed", "memory", "context", "gpu"],
                        help="default: speed, memory and context, and gpu on a GPU")
    parser.add_argument("--child-memory", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        impl, path, variant, device, n = args.child_memory
        return child_memory(impl, path, variant, device, int(n))
    device = torch.device(args.device)
    args.models = args.models or [m for m in SHAPES if device.type == "cuda" or m not in GPU_ONLY]
    args.sections = args.sections or ["speed", "memory", "context"] + (["gpu"] if device.type == "cuda" else [])
    variants = [v for v in args.variants if VARIANTS[v][1] is None or device.type == "cpu"]
    bandwidth = copy_bandwidth(device)
    print(f"device {device} ({torch.get_num_threads()} threads), copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"{args.new_tokens} new tokens after a 32-token prompt, best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name in args.models:
            paths[name] = Path(tmp) / name
            build(SHAPES[name], paths[name])
        if "speed" in args.sections:
            print("\nspeed (int8: int8 weights, float32 activations, against transformers float32)")
            print(f"{'model':<14}{'weights':<19}{'parley tok/s':>13}{'hf tok/s':>10}{'speedup':>9}{'4 vs 1':>8}"
                  f"{'of BW':>7}{'step ms = read + rest':>23}{'ops/step parley, hf':>21}")
            for name in args.models:
                for variant in variants:
                    r = bench(name, paths[name], variant, device, args.new_tokens, args.repeats, bandwidth)
                    print(f"{r['model']:<14}{r['variant']:<19}{r['parley']:>13.1f}{r['transformers']:>10.1f}"
                          f"{r['speedup']:>8.2f}x{r['side_by_side']:>7.2f}x{r['bandwidth_fraction']:>6.0%}"
                          f"{r['step_ms']:>10.1f} = {r['read_ms']:.1f} + {r['step_ms'] - r['read_ms']:.1f}"
                          + (f"{'-':>13}, {r['ops'][1]:.0f}  (compiling: {r['compile_s']:.0f} s)"
                             if r["compile_s"] is not None else f"{r['ops'][0]:>13.0f}, {r['ops'][1]:.0f}"), flush=True)
        if "memory" in args.sections:
            print(f"\npeak resident memory above the process's start, MiB: while loading, and while decoding "
                  f"{args.new_tokens} tokens (fresh process each; int8 against transformers float32)")
            print(f"{'model':<14}{'weights':<10}{'load parley':>12}{'hf':>7}{'decode parley':>15}{'hf':>7}{'ratio':>8}")
            for name in args.models:
                for variant in (v for v in variants if not v.endswith("-compiled")):
                    ours = peak_memory("parley", paths[name], variant, args.device, args.new_tokens)
                    theirs = peak_memory("transformers", paths[name], variant, args.device, args.new_tokens)
                    print(f"{name:<14}{variant:<10}{ours[0]:>12.0f}{theirs[0]:>7.0f}{ours[1]:>15.0f}{theirs[1]:>7.0f}"
                          f"{ours[1] / theirs[1]:>7.2f}x", flush=True)
        if "gpu" in args.sections:
            print("\nbfloat16, batch 1: decode tokens/s of Parley (captured step, eager loop) and transformers "
                  "(eager, static cache compiled); speedup against the better transformers; share of bandwidth")
            print(f"{'model':<14}{'captured':>9}{'eager':>8}{'hf':>8}{'hf static':>10}{'speedup':>9}{'of BW':>7}")
            results = []
            for name in args.models:
                r = bench_gpu(name, paths[name], device, args.new_tokens, args.repeats, bandwidth)
                results.append(r)
                rate = r["rate"]
                print(f"{name:<14}{rate['captured']:>9.1f}{rate['eager']:>8.1f}{rate['hf']:>8.1f}{rate['hf_static']:>10.1f}"
                      f"{rate['captured'] / r['best_hf']:>8.2f}x{r['bandwidth_fraction']:>6.0%}", flush=True)
            print("\nbfloat16 throughput, tokens/s over all rows: Parley captured / transformers eager")
            for r in results:
                cells = "  ".join(f"{rows}: {b['parley']:.0f} / {b['hf']:.0f} ({b['parley'] / b['hf']:.2f}x)"
                                  for rows, b in r["batches"].items())
                print(f"{r['model']:<14}{cells}", flush=True)
        if "context" in args.sections:
            n, repeats = 32, max(3, args.repeats // 2)
            print(f"\ndecode tokens/s with the context at each length ({n} new tokens, best of {repeats}), and "
                  "time to the first token of a 400-token prompt; float32; parley / transformers")
            for name in args.models:
                r = context_rates(name, paths[name], device, n, repeats)
                cells = "  ".join(f"{length}: {a:.1f} / {b:.1f} ({a / b:.2f}x)" for length, (a, b) in r["rates"].items())
                a, b = r["ttft"]
                print(f"{name:<14}{cells}  | first token of 400: {1e3 * a:.0f} / {1e3 * b:.0f} ms ({b / a:.2f}x)",
                      flush=True)


if __name__ == "__main__":
    main()
