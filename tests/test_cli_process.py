"""The real `imagen` command in its own process: what a user, a shell script or a job scheduler sees.

In-process CLI tests cannot show these: the whole of stderr (pytest's log handlers take the warnings), the exit
status, and signals sent to a training process from outside (docker stop, Kubernetes and Slurm send SIGTERM).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

IMAGEN = Path(sys.executable).with_name("imagen")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TRAIN = ["finetune", "--task", "classify", "--data", "shapes", "--n", "64", "--label", "shape", "--max-steps", "24",
         "--batch-size", "16", "--precision", "fp32", "--no-progress", "--report-to", "jsonl", "--set", "train.log_every=1",
         "--set", "model.dim=32", "--set", "model.num_layers=2", "--set", "model.num_heads=2"]


def imagen(*args, **kw):
    return subprocess.run([str(IMAGEN), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300, **kw)


@pytest.fixture(scope="module", autouse=True)
def installed():
    if not IMAGEN.exists():
        pytest.skip(f"no installed `imagen` command beside {sys.executable}")


def test_help_from_the_command_and_from_python_m():
    for argv in ([str(IMAGEN), "--help"], [sys.executable, "-m", "imagen", "--help"]):
        done = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=120)
        assert done.returncode == 0 and "usage: imagen" in done.stdout and done.stderr == "", done.stderr


def test_a_mistake_is_one_line_on_stderr(tmp_path):
    for args in (["finetune", "--task", "segment", "--out", tmp_path / "a"],
                 ["finetune", "--task", "classify", "--data", tmp_path / "missing", "--out", tmp_path / "b"],
                 ["predict", "--run", tmp_path / "nothing", "x.png"]):
        done = imagen(*args)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith(f"imagen {args[0]}: error: ")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _steps_logged(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.strip().endswith("}")), default=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "whole"
    done = imagen(*TRAIN, "--out", out)
    assert done.returncode == 0, done.stderr
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_resume_ends_where_an_uninterrupted_run_does(tmp_path, signum, uninterrupted):
    run = tmp_path / "stopped"
    proc = subprocess.Popen([str(IMAGEN), *map(str, TRAIN), "--out", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    while _steps_logged(run) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert f"interrupted ({name}) at step" in err and "--resume" in err, err
    assert not (run / "model.safetensors").exists() and any((run / "checkpoints").glob("step-*"))
    resumed = imagen(*TRAIN, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = uninterrupted, load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
