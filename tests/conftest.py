"""Fixtures shared by the command-line tests: a small Shapes folder and a tiny pretraining run on it."""

import pytest
import torch

from cli_helpers import TINY
from imagen.cli import main


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--n", "120", "--seed", "3", "--max-objects", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def pretrained(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pre"
    assert main(["pretrain", "--data", str(shapes_dir), "--out", str(out), "--max-steps", "4", *TINY]) == 0
    return out


@pytest.fixture
def one_thread():
    """Tiny models: on a busy machine OpenMP threads spin-wait on each other (~100x slower), so use one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
