"""Run directories written by older code still load and give the same answers.

tests/fixtures/runs/ holds one tiny finished run of each kind, written at commit ec2aa57 by
tests/fixtures/make_runs.py; tests/fixtures/expected.json (and expected/t2i.png) hold what that code printed
for the two images in tests/fixtures/inputs/. Only the command line (`imagen.cli.main`) and `imagen.load` are
used here, so the internals may move freely; the run-directory format and the predictions may not.
Never regenerate the fixtures to make this test pass: a failure means old runs no longer load or predict alike.
(Once, deliberately: the text-to-image picture is the n=1 sample, drawn by ec2aa57 itself, since chunked
generation gives every sample its own noise stream and so changed samples 1.. of a multi-sample request.)
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imagen
from imagen.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
UNDERSTANDING = [name for name, r in EXPECTED["runs"].items() if r["kind"] not in ("pretrain", "text-to-image")]
TOL = 1e-4
BOX_TOL = 0.011  # detect boxes are printed rounded to 2 decimals: float noise may flip the last digit


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def fixtures(tmp_path):
    """A private copy of the runs and inputs, so nothing is ever written into tests/fixtures."""
    shutil.copytree(FIXTURES / "runs", tmp_path / "runs")
    shutil.copytree(FIXTURES / "inputs", tmp_path / "inputs")
    return tmp_path


def assert_same(actual, expected, where="output", abs_tol=TOL):
    """Equal structure and strings; floats within TOL (relative or absolute)."""
    if isinstance(expected, float) or isinstance(actual, float):
        assert isinstance(actual, (int, float)) and not isinstance(actual, bool), f"{where}: {actual!r} is not a number"
        assert math.isclose(actual, expected, rel_tol=TOL, abs_tol=abs_tol), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), f"{where}: keys {sorted(actual) if isinstance(actual, dict) else actual!r} != {sorted(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], f"{where}.{k}", BOX_TOL if k == "box" else abs_tol)
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]", abs_tol)
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def normalise(text: str, inputs: Path) -> str:
    """The input files' folder -> `<inputs>`, as in expected.json."""
    return text.replace(str(inputs), "<inputs>")


def cli(capsys, *argv) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, f"imagen {' '.join(map(str, argv))} exited {code}: {err}"
    return out


@pytest.mark.parametrize("name", UNDERSTANDING)
def test_predict_matches_old_output(name, fixtures, capsys):
    spec = EXPECTED["runs"][name]
    inputs = [fixtures / "inputs" / f for f in EXPECTED["inputs"]]
    out = cli(capsys, "predict", "--run", fixtures / "runs" / name, "--json", *inputs, *spec["predict_args"])
    lines = [json.loads(normalise(line, fixtures / "inputs")) for line in out.splitlines() if line.strip()]
    assert_same(lines, spec["output"], name)


def _images(paths) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def test_pretrain_run_loads_with_same_encoder(fixtures):
    spec = EXPECTED["runs"]["pretrain"]
    loaded = imagen.load(fixtures / "runs" / "pretrain")
    assert loaded.task == "pretrain"
    with torch.no_grad():
        embed = loaded.model.encoder(images=_images([fixtures / "inputs" / f for f in EXPECTED["inputs"]])).image_embed
    assert_same(embed.tolist(), spec["image_embed"], "pretrain image_embed")


def test_text_to_image_generates_same_picture(fixtures, capsys):
    spec = EXPECTED["runs"]["t2i"]
    out = fixtures / "t2i.png"
    cli(capsys, "generate", "--run", fixtures / "runs" / "t2i", *spec["generate_args"], "--out", out)
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    want = np.asarray(Image.open(FIXTURES / spec["expected_png"]).convert("RGB"), dtype=np.int16)
    assert got.shape == want.shape
    assert int(np.abs(got - want).max()) <= 1


def test_fixtures_are_complete():
    """Every kind of run is covered, and each fixture holds only what loading needs."""
    kinds = {r["kind"] for r in EXPECTED["runs"].values()}
    assert kinds == {"pretrain", "classify", "vqa", "caption", "detect", "retrieval", "instruct", "text-to-image"}
    for run in (FIXTURES / "runs").iterdir():
        assert (run / "config.json").is_file()
        assert not (run / "checkpoints").exists()
