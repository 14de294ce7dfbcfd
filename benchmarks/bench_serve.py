"""parley serve under load: concurrent streaming clients against the same requests one after another.

    python benchmarks/bench_serve.py [--model default] [--clients 32] [--max-tokens 64] [--repeats 2]
                                     [--timeout 600] [--device cpu|cuda] [--no-log-compare]

Starts a real `parley serve --port 0` in a subprocess (localhost only, --no-log), then with the
official `openai` client (AsyncOpenAI, raw server-sent events):
  - concurrent: --clients streaming chat requests at once, each its own prompt and seed, every
    reply exactly --max-tokens long (min_new_tokens = max_tokens, so both runs decode the same load);
  - sequential: the same requests one after another.
Every stream must end with `data: [DONE]`, a finish_reason and a usage chunk, with no error, and
the whole benchmark must end within --timeout; anything else stops the benchmark with the failures listed. It prints time to
first token (p50/p95: from sending the request to the first chunk with text), total completion
tokens/s of each run and their ratio, and whether each reply's text is the same both ways (a
request's tokens for its seed should not depend on what else runs). Unless --no-log-compare, a
second server keeps every request in a temporary store (PARLEY_HOME in a temporary folder); the
two servers' concurrent runs take turns, best of --repeats each, and that store is checked to hold
every request.
"""
import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["the sea", "your favourite book", "rainy afternoons", "learning to cook", "a long walk", "music",
          "old friends", "the weekend", "trains", "gardening", "a new job", "the mountains", "coffee", "chess",
          "winter", "a film you liked"]


class Failed(Exception):
    """The benchmark cannot go on: main() prints the message."""


class Server:
    """`parley serve` in a subprocess on a free localhost port; `home` set: it logs to that PARLEY_HOME."""

    def __init__(self, args, home: str | None):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PARLEY_HOME": home or os.environ.get("PARLEY_HOME", "")}
        if not env["PARLEY_HOME"]:
            del env["PARLEY_HOME"]
        command = [sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main(sys.argv[1:]))",
                   "serve", "--model", args.model, "--host", "127.0.0.1", "--port", "0",
                   "--max-tokens", str(args.max_tokens)] + (["--device", args.device] if args.device else []) + \
                  ([] if home else ["--no-log"])
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
            if found:
                self.url = found.group(1)
                # keep reading its stderr, so a chatty server never blocks on a full pipe
                threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()
                return
        self.stop()
        raise Failed("parley serve did not start:\n" + "".join(lines))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def requests(args) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}." + " Please." * (i % 3)}],
             "seed": 1000 + i} for i in range(args.clients)]


async def stream_one(client: openai.AsyncOpenAI, model: str, request: dict, max_tokens: int) -> dict:
    """One streamed chat request, read as raw event lines; what came back and when."""
    sent = time.perf_counter()
    first, text, finish, usage, done, errors = None, [], None, None, False, []
    async with client.chat.completions.with_streaming_response.create(
            model=model, messages=request["messages"], seed=request["seed"], max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"min_new_tokens": max_tokens}) as response:
        async for line in response.iter_lines():
            if not line:
                continue
            if done:
                errors.append(f"data after [DONE]: {line[:80]}")
            elif line == "data: [DONE]":
                done = True
            elif not line.startswith("data: "):
                errors.append(f"not a data line: {line[:80]}")
            else:
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append(chunk["error"]["message"])
                    continue
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        first = first or time.perf_counter()
                        text.append(choice["delta"]["content"])
                    finish = choice.get("finish_reason") or finish
                usage = chunk.get("usage") or usage
    if not done:
        errors.append("the stream ended without data: [DONE]")
    if finish is None:
        errors.append("no finish_reason")
    if usage is None:
        errors.append("no usage chunk")
    return {"ttft": (first or time.perf_counter()) - sent, "text": "".join(text), "errors": errors,
            "tokens": usage["completion_tokens"] if usage else 0}


async def warm_up(url: str, model: str) -> None:
    """One short request first: the model's first forward passes are not part of either run."""
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0) as client:
        result = await stream_one(client, model, {"messages": [{"role": "user", "content": "Hello"}], "seed": 0}, 4)
    if result["errors"]:
        raise Failed("the warm-up request failed: " + "; ".join(result["errors"]))


async def run(url: str, args, concurrent: bool) -> tuple[float, list[dict]]:
    """Every request, all at once or one after another: (wall seconds, results in request order)."""
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=args.timeout)
    todo = requests(args)
    start = time.perf_counter()
    try:
        if concurrent:
            results = await asyncio.gather(*(stream_one(client, args.model, r, args.max_tokens) for r in todo),
                                           return_exceptions=True)
        else:
            results = []
            for r in todo:
                try:
                    results.append(await stream_one(client, args.model, r, args.max_tokens))
                except Exception as e:   # noqa: BLE001 -- reported with the others below
                    results.append(e)
    finally:
        await client.close()
    wall = time.perf_counter() - start
    results = [{"errors": [f"{type(r).__name__}: {r}"], "tokens": 0, "ttft": 0.0, "text": ""}
               if isinstance(r, BaseException) else r for r in results]
    return wall, results


def check(name: str, results: list[dict], max_tokens: int) -> None:
    failed = [(i, r["errors"]) for i, r in enumerate(results) if r["errors"]]
    short = [i for i, r in enumerate(results) if not r["errors"] and r["tokens"] != max_tokens]
    if failed or short:
        lines = [f"  request {i}: {'; '.join(errors)}" for i, errors in failed[:10]]
        lines += [f"  request {i}: {results[i]['tokens']} tokens, not {max_tokens}" for i in short[:10]]
        raise Failed(f"{name}: {len(failed)} failed, {len(short)} short of {max_tokens} tokens:\n" + "\n".join(lines))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(name: str, wall: float, results: list[dict]) -> float:
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    rate = tokens / wall
    print(f"{name:<34} {rate:8.1f} tok/s  ({tokens} tokens in {wall:6.2f} s)  "
          f"first token p50 {percentile(ttft, 0.5) * 1000:7.0f} ms  p95 {percentile(ttft, 0.95) * 1000:7.0f} ms")
    return rate


async def bench(args) -> None:
    with tempfile.TemporaryDirectory() as home:
        servers = {"no-log": Server(args, None)}
        try:
            if not args.no_log_compare:
                servers["logged"] = Server(args, home)
            for server in servers.values():
                await warm_up(server.url, args.model)
            # the concurrent runs take turns (best of --repeats each), so a slow spell of a shared
            # machine slows both servers alike
            best: dict[str, tuple[float, list]] = {}
            for repeat in range(args.repeats):
                for name, server in servers.items():
                    wall, results = await run(server.url, args, True)
                    check(f"concurrent ({name})", results, args.max_tokens)
                    if name not in best or wall < best[name][0]:
                        best[name] = wall, results
            wall_s, sequential = await run(servers["no-log"].url, args, False)
            check("sequential", sequential, args.max_tokens)
        finally:
            for server in servers.values():
                server.stop()   # a logging server writes what its log holds before it exits
        load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
        print(f"parley serve {args.model} ({args.device or 'default device'}, {os.cpu_count()} CPUs{load}): "
              f"{args.clients} streaming chat requests of {args.max_tokens} tokens; concurrent: best of {args.repeats}")
        wall_c, concurrent = best["no-log"]
        rate_c = report(f"concurrent ({args.clients} at once), --no-log", wall_c, concurrent)
        rate_s = report("sequential (one after another)", wall_s, sequential)
        print(f"concurrent / sequential throughput: {rate_c / rate_s:.2f}x")
        same = sum(c["text"] == s["text"] for c, s in zip(concurrent, sequential))
        print(f"replies identical concurrent and sequential: {same} of {args.clients}")
        if args.no_log_compare:
            return
        rate_l = report(f"concurrent ({args.clients} at once), logged", *best["logged"])
        print(f"logged / --no-log throughput: {rate_l / rate_c:.2f}x")
        os.environ["PARLEY_HOME"] = home
        sys.path.insert(0, str(ROOT))
        from engine.store import Store
        with Store() as store:
            kept = len(store.conversations())
        expected = 1 + args.repeats * args.clients   # the warm-up and every concurrent request
        if kept != expected:
            raise Failed(f"the logging server's store holds {kept} conversations, not {expected}")
        print(f"the logging server's store holds all {kept} requests (the warm-up included)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="a model directory or known name (default: the shipped one)")
    parser.add_argument("--device", help="cpu, cuda or mps (default: parley serve's)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming requests (1 to 64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (1 to 512)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds the whole benchmark may take")
    parser.add_argument("--repeats", type=int, default=2, help="concurrent runs per server (best kept)")
    parser.add_argument("--no-log-compare", action="store_true", help="skip the run against a server that logs")
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.max_tokens <= 512 or not 1 <= args.repeats <= 5:
        parser.error("--clients must be 1 to 64, --max-tokens 1 to 512 and --repeats 1 to 5: a bounded load test")
    async def bounded():
        try:
            await asyncio.wait_for(bench(args), args.timeout)   # cancelled, it still stops its servers
        except TimeoutError:
            raise Failed(f"the benchmark took more than --timeout {args.timeout:g} s") from None
    try:
        asyncio.run(bounded())
    except Failed as e:
        sys.exit(f"bench_serve: {e}")


if __name__ == "__main__":
    main()
