"""How soon the app is up: time to its first frame and to "ready" (the model loaded).

    python benchmarks/bench_startup.py [--model default] [--repeats 3]

Each run is a fresh process (headless, a throwaway PARLEY_HOME), timed from its spawn. The
reference, measured in the same run: a process that only imports torch — what the first frame
would wait for if the app imported it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(model: str) -> None:
    """In the measured process: print when the first frame was drawn and when the model was ready,
    and whether torch was imported by then."""
    sys.path.insert(0, str(ROOT))
    from tui_app.app import ParleyApp
    marks = {}

    class Probe(ParleyApp):
        def on_mount(self) -> None:
            self.call_after_refresh(self.first_frame)   # before the base class schedules the model load
            super().on_mount()

        def first_frame(self) -> None:
            marks["first_frame"] = (time.time(), "torch" in sys.modules)

        def model_loaded(self, info) -> None:
            super().model_loaded(info)
            marks["ready"] = (time.time(), "torch" in sys.modules)
            self.exit()

        def model_failed(self, message: str) -> None:
            marks["failed"] = message
            self.exit()

    Probe(model=model, device="cpu").run(headless=True)
    print(json.dumps(marks))


def spawn(args: list[str], home: str) -> tuple[float, str]:
    start = time.time()
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PARLEY_HOME": home}, check=True).stdout
    return start, out


def measure(model: str) -> dict:
    """One fresh app process: seconds from spawn to the first frame and to ready."""
    with tempfile.TemporaryDirectory() as home:
        start, out = spawn([__file__, "--child", "--model", model], home)
    marks = json.loads(out.strip().splitlines()[-1])
    if "failed" in marks:
        raise SystemExit(f"the model did not load: {marks['failed']}")
    return {"first_frame_s": marks["first_frame"][0] - start, "torch_at_first_frame": marks["first_frame"][1],
            "ready_s": marks["ready"][0] - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.model)
    runs = [measure(args.model) for _ in range(args.repeats)]
    torch_s = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as home:
            start = time.time()
            spawn(["-c", "import torch"], home)
            torch_s.append(time.time() - start)
    first = statistics.median(r["first_frame_s"] for r in runs)
    ready = statistics.median(r["ready_s"] for r in runs)
    ref = statistics.median(torch_s)
    print(f"model {args.model}, median of {args.repeats} fresh processes")
    print(f"  first frame        {first:6.2f} s   (torch imported by then: {any(r['torch_at_first_frame'] for r in runs)})")
    print(f"  ready              {ready:6.2f} s")
    print(f"  import torch alone {ref:6.2f} s   (reference)")
    print(f"  first frame / import torch: {first / ref:.2f}x")


if __name__ == "__main__":
    main()
