"""Every bad model directory gets one clear line naming the problem and the fix."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine
from engine import ParleyError


@pytest.fixture
def model_dir(checkpoints, tmp_path):
    path, _ = checkpoints("llama_gqa_untied")
    shutil.copytree(path, tmp_path / "m")
    return tmp_path / "m"


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def drop_config_key(path, key):
    config = json.loads((path / "config.json").read_text())
    del config[key]
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def remove(name):
    return lambda path: (path / name).unlink()


def pickled_only(path):
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled, never opened")


def rename_tensor(path):
    edit_tensors(path, lambda t: t.update({"model.layers.0.mlp.gate.weight": t.pop("model.layers.0.mlp.gate_proj.weight")}))


def reshape_tensor(path):
    edit_tensors(path, lambda t: t.update({"model.norm.weight": torch.ones(65)}))


def drop_tensor(path):
    edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))


CASES = {
    "missing directory": (lambda p: shutil.rmtree(p), r"does not exist"),
    "missing config": (remove("config.json"), r"has no config\.json"),
    "missing tokenizer": (remove("tokenizer.json"), r"has no tokenizer\.json"),
    "missing weights": (remove("model.safetensors"), r"has no model\.safetensors"),
    "pickled weights only": (pickled_only, r"only pickled PyTorch weights \(pytorch_model\.bin\).*never unpickles.*"
                                           r"safe_serialization=True"),
    "unsupported model type": (lambda p: edit_config(p, model_type="bert"),
                               r"model_type 'bert' is not supported: use one of gemma2, gemma3_text, gpt2, llama, "
                               r"mistral, phi3, qwen2, qwen3, smollm3 "
                               r"\(or Parley.s own: ngram, parley_gpt, parley_nnlm, parley_rnn\)"),
    "config missing a field": (lambda p: drop_config_key(p, "hidden_size"),
                               r"lacks 'hidden_size'"),
    "unknown tensor name": (rename_tensor, r"tensor 'model\.layers\.0\.mlp\.gate\.weight' is not part of the model"),
    "wrong tensor shape": (reshape_tensor, r"tensor 'model\.norm\.weight' has shape \[65\] but config\.json implies \[64\]"),
    "missing tensor": (drop_tensor, r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' is missing"),
    "corrupt weights": (lambda p: (p / "model.safetensors").write_bytes(b"\x00garbage"), r"not a readable safetensors"),
    "corrupt config": (lambda p: (p / "config.json").write_text("{not json"), r"config\.json is not valid JSON"),
    "unsupported rope": (lambda p: edit_config(p, rope_scaling={"rope_type": "yarn", "factor": 2.0}),
                         r"rope scaling type 'yarn' is not supported: use one of default, linear, llama3"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_model_directory_gives_one_clear_line(model_dir, case):
    break_it, message = CASES[case]
    break_it(model_dir)
    with pytest.raises(ParleyError, match=message) as e:
        engine.load(model_dir, device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["missing config", "pickled weights only", "unsupported model type",
                                  "wrong tensor shape"])
def test_cli_reports_bad_model_without_traceback(model_dir, case):
    CASES[case][0](model_dir)
    run = subprocess.run([sys.executable, "-c", "from tui_app.main import main; main()", "inspect", str(model_dir),
                          "--device", "cpu"], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.startswith("parley: error: ") and run.stderr.count("\n") == 1
    assert "Traceback" not in run.stderr


def test_cli_inspect_describes_a_good_model(model_dir):
    run = subprocess.run([sys.executable, "-c", "from tui_app.main import main; main()", "inspect", str(model_dir),
                          "--device", "cpu", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["model_type"] == "llama" and info["dtype"] == "float32" and info["chat_template"]


def test_pickled_file_is_never_opened(model_dir, monkeypatch):
    pickled_only(model_dir)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    with pytest.raises(ParleyError):
        engine.load(model_dir, device="cpu")


def test_bad_device_and_dtype(model_dir):
    with pytest.raises(ParleyError, match="unknown dtype 'float8': use one of float32, bfloat16, float16"):
        engine.load(model_dir, device="cpu", dtype="float8")
    with pytest.raises(ParleyError, match="unknown device"):
        engine.load(model_dir, device="tpu9")
