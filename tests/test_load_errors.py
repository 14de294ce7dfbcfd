"""Loading through the real entry point, and the load options (the bad directories: test_bad_input_loading.py)."""
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


def edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def pickled_only(path):
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled, never opened")


# The bad-input classes themselves are in test_bad_input_loading.py; these few run the real entry point.
CLI_CASES = {
    "missing config": lambda p: (p / "config.json").unlink(),
    "pickled weights only": pickled_only,
    "unsupported model type": lambda p: edit_config(p, model_type="bert"),
    "wrong tensor shape": lambda p: edit_tensors(p, lambda t: t.update({"model.norm.weight": torch.ones(65)})),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_reports_bad_model_without_traceback(model_dir, case):
    CLI_CASES[case](model_dir)
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
