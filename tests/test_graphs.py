"""The static decoding step (engine/graphs.py): rows in buckets, a cache whose tensors stay put,
captured as a CUDA graph on a GPU. On the CPU the same buffers and buckets run without a graph."""
import shutil
import warnings

import pytest
import torch

import engine
from engine import graphs
from engine.generate import Finished, Generation, Token
from engine.settings import Settings

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU; none is here")


def test_buckets_pad_rows_with_copies_of_the_first():
    assert [graphs.bucket(n) for n in (1, 2, 3, 4, 5, 17, 64, 65)] == [1, 2, 4, 4, 8, 32, 64, 128]
    assert graphs.padded(torch.tensor([3, 1, 2])).tolist() == [3, 1, 2, 3]
    assert graphs.padded(torch.tensor([5, 6])).tolist() == [5, 6]
    assert graphs.padded(torch.tensor([], dtype=torch.long)).tolist() == []


def candidates():
    """Rows that end at different steps (the batch shrinks from bucket 8 to 4, 2, 1), greedy and
    sampled, with penalties that read each row's own history."""
    lengths = [3, 5, 9, 14, 20]
    return [Settings(temperature=0 if i % 2 else 0.8, top_k=20, seed=i, repetition_penalty=1.3,
                     max_new_tokens=n, min_new_tokens=n) for i, n in enumerate(lengths)]


def run(lm, prompts, settings, static, prompt_of=None, cancel_at=None):
    gen = Generation(lm, prompts, settings, top_alternatives=0, prompt_of=prompt_of, static=static)
    out = {}
    for event in gen:
        if isinstance(event, Token) and cancel_at and event.step == cancel_at[1] and event.candidate == 0:
            gen.cancel(cancel_at[0])
        if isinstance(event, Finished):
            out[event.candidate] = (event.token_ids, event.finish_reason)
    return out, gen


@pytest.mark.parametrize("name", ["llama_gqa_untied", "gpt2", "mistral"])
def test_static_step_gives_the_tokens_of_the_plain_loop(checkpoints, name):
    """Two prompts of different lengths (padding), five candidates ending one after another: the
    static step pads them to bucket 8 and shrinks the cache to buckets 4, 2 and 1 as rows finish;
    every candidate's tokens are the plain loop's."""
    lm = engine.load(checkpoints(name)[0], device="cpu")
    prompts = [lm.tokenizer.encode("Hello there! How are you today?"), lm.tokenizer.encode("Hi")]
    prompt_of = [0, 1, 0, 1, 0]
    plain, _ = run(lm, prompts, candidates(), static=False, prompt_of=prompt_of)
    static, gen = run(lm, prompts, candidates(), static=True, prompt_of=prompt_of)
    assert static == plain
    # one set-up per bucket (8, 4 when three rows live, 2, 1), none per step: the tensors stayed put
    assert gen.step.captures == 4


def test_static_step_follows_beams_and_cancelled_candidates(checkpoints):
    """Beams reorder the cache's rows every step, in place (one set-up for the whole search); a
    cancelled candidate's row leaves the batch mid-run."""
    lm = engine.load(checkpoints("llama_gqa_untied")[0], device="cpu")
    prompt = lm.tokenizer.encode("Tell me a story")
    beams = [Settings(num_beams=3, max_new_tokens=8, length_penalty=0.5)]
    plain, _ = run(lm, prompt, beams, static=False)
    static, gen = run(lm, prompt, beams, static=True)
    assert static == plain
    assert gen.step.captures == 1
    three = [Settings(temperature=0, max_new_tokens=10, min_new_tokens=10, seed=s) for s in range(3)]
    plain, _ = run(lm, prompt, three, static=False, cancel_at=(1, 3))
    static, gen = run(lm, prompt, three, static=True, cancel_at=(1, 3))
    assert static == plain and static[1][1] == "cancelled"
    assert gen.step.captures == 2   # bucket 4, then the cache without the cancelled row (bucket 2)


def inductor_builds_here() -> bool:
    """Whether torch.compile's CPU backend can build a kernel here (a C++ compiler, Python's headers)."""
    if not (shutil.which("c++") or shutil.which("g++")):
        return False
    try:
        double = torch.compile(lambda x: x * 2 + 1, fullgraph=True)
        return torch.equal(double(torch.arange(4.0)), torch.arange(4.0) * 2 + 1)
    except Exception:   # the compiler's errors have no common base class
        return False


def test_compiled_step_gives_the_tokens_of_the_eager_loop(checkpoints):
    """engine.load(..., compile=True): the static step through torch.compile with dynamic shapes, each
    weight product one opaque decode_product op running oneDNN's packed kernel. Candidates ending one
    after another (rows 4, then 2, then 1) and a second run of another width get the greedy tokens of
    the decode-only eager loop; the compiled step ran throughout (a failure to compile would fall back
    to the eager step with a warning, here an error)."""
    if not inductor_builds_here():
        pytest.skip("torch.compile's CPU backend cannot build kernels here (it needs a C++ compiler and Python's headers)")
    path = checkpoints("llama_gqa_untied")[0]
    compiled = engine.load(path, device="cpu", compile=True)
    plain = engine.load(path, device="cpu", decode_only=True)
    prompt = plain.tokenizer.encode("Hello there! How are you today?")
    for lengths in ((3, 7, 12), (20,)):
        greedy = [Settings(temperature=0, max_new_tokens=n, min_new_tokens=n) for n in lengths]
        eager, _ = run(plain, prompt, greedy, static=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="the decoding step could not")
            ours, gen = run(compiled, prompt, greedy, static=None)
        assert ours == eager
        assert gen.step.step is compiled.compiled_step


@CUDA
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_captured_step_gives_the_greedy_tokens_of_the_eager_loop(checkpoints, dtype):
    """On a GPU the static step is a CUDA graph, replayed: greedy ids as the eager loop's."""
    lm = engine.load(checkpoints("llama_gqa_untied")[0], device="cuda", dtype=dtype)
    prompts = [lm.tokenizer.encode("Hello there! How are you today?"), lm.tokenizer.encode("Hi")]
    greedy = [Settings(temperature=0, max_new_tokens=n, min_new_tokens=n) for n in (4, 9, 16)]
    eager, _ = run(lm, prompts, greedy, static=False, prompt_of=[0, 1, 0])
    captured, gen = run(lm, prompts, greedy, static=True, prompt_of=[0, 1, 0])
    assert captured == eager
    assert gen.step.graph is not None and gen.step.captures == 3   # buckets 4, 2, 1
