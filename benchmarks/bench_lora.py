"""Memory and step time of full versus LoRA training (engine/lora.py).

    PYTHONPATH=. python benchmarks/bench_lora.py [--steps 3] [--batch 4] [--seq 128] [--device cpu]

For the shipped model (assets/default-model) and a random model of SmolLM2-135M's shape (built
here, nothing downloaded): AdamW steps of next-token loss on random tokens, every weight trained
versus a rank-8 adapter on every projection (the default of --lora-r). Each case runs in a fresh
process, so its peak memory is its own: the resident set (ru_maxrss) on the CPU, torch's peak
allocated memory on CUDA, beside the exact bytes of weights, gradients and AdamW's two moments.
The step time is the median over --steps steps after one warm-up step.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0)


def one(model_name: str, mode: str, steps: int, batch: int, seq: int, device: str) -> dict:
    import torch

    import engine
    from engine import lora
    from engine.models import family
    from engine.train.logprobs import summed_loss
    torch.manual_seed(0)
    if model_name == "default":
        model = engine.load("assets/default-model", device=device, dtype="float32").model
    else:
        fam = family("llama")
        model = fam.Model(fam.Config.from_hf(SMOLLM2_135M)).to(device)
    vocab = model.lm_head.weight.shape[0]
    if mode == "lora":
        lora.attach(model, 8, 16.0, lora.default_targets(model))
        lora.freeze_base(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, vocab, (batch, seq + 1), device=device)
        mask = torch.ones(batch, seq, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = summed_loss(model, ids, mask) / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:   # the first step warms up (allocations, kernels)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024
    state = sum(p.numel() * 4 for p in model.parameters()) + sum(p.numel() * 4 * 3 for p in params)
    return {"model": model_name, "mode": mode, "trained": sum(p.numel() for p in params), "state_mib": state / 2**20,
            "parameters": sum(p.numel() for p in model.parameters()), "peak_mib": peak / 2**20,
            "step_s": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)   # MODEL MODE, in a fresh process
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(*a.one, a.steps, a.batch, a.seq, a.device)))
        return
    print(f"{a.batch} x {a.seq} tokens per step, AdamW, float32, {a.device}; LoRA: r 8 on every projection")
    print(f"{'model':<14} {'training':<8} {'trained params':>14} {'weights+grads+Adam':>19} {'peak memory':>12} "
          f"{'step time':>10}")
    for model_name in ("default", "smollm2-135m"):
        for mode in ("full", "lora"):
            out = subprocess.run([sys.executable, __file__, "--one", model_name, mode, "--steps", str(a.steps),
                                  "--batch", str(a.batch), "--seq", str(a.seq), "--device", a.device],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{model_name:<14} {mode:<8} {r['trained'] / 1e6:>12.2f} M {r['state_mib']:>15.0f} MiB "
                  f"{r['peak_mib']:>8.0f} MiB {r['step_s']:>9.2f}s")


if __name__ == "__main__":
    main()
