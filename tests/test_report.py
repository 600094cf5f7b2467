"""`imagen report`: one self-contained HTML page (parsed here; opened in headless Chromium), built from tiny runs
that were trained, evaluated and compared; sample grids also land in TensorBoard as image summaries."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import TINY, one_line_error, run_cli
from imagen.cli import main

T2I_TINY = ["--sizes", "8,16", "--n", "48", "--batch-size", "8", "--no-progress", "--precision", "fp32", "--text-encoder", "trainable",
            "--set", "base.unet.dim=16", "--set", "base.unet.num_heads=2", "--set", "sr1.unet.dim=16", "--set", "sr1.unet.num_heads=2"]
CHROMIUM = Path("/usr/bin/chromium")


class Page(HTMLParser):
    """The parts of a report a test looks at: section ids, images, tables, scripts and external references."""

    def __init__(self, text: str):
        super().__init__()
        self.sections, self.images, self.tables, self.scripts, self.links = [], [], [], 0, []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "script":
            self.scripts += 1
        elif tag == "table":
            self.tables.append({"class": attrs.get("class"), "cells": []})
        elif tag in ("td", "th"):
            self._cell = []
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["cells"].append("".join(self._cell).strip())
            self._cell = None


@pytest.fixture(scope="module")
def runs(shapes_dir, pretrained, tmp_path_factory):
    """A fine-tuned classifier (evaluated against a from-scratch one), its baseline, and a tiny cascade."""
    root = tmp_path_factory.mktemp("report")
    cls, scratch, t2i = root / "cls", root / "cls-scratch", root / "t2i"
    common = ["--task", "classify", "--data", str(shapes_dir), "--max-steps", "6", "--eval-every", "3", "--label", "shape"]
    assert main(["finetune", *common, "--init-from", str(pretrained), "--out", str(cls), "--no-progress", "--batch-size", "16"]) == 0
    assert main(["finetune", *common, "--out", str(scratch), "--preset", "tiny", *TINY]) == 0
    assert main(["evaluate", "--run", str(cls), "--data", str(shapes_dir), "--compare", str(scratch)]) == 0
    assert main(["train-t2i", "--data", "shapes", "--out", str(t2i), "--max-steps", "2", "--sample-every", "1",
                 "--report-to", "jsonl,tensorboard", *T2I_TINY]) == 0
    return {"pre": pretrained, "cls": cls, "scratch": scratch, "t2i": t2i}


@pytest.fixture
def report(runs, tmp_path, capsys, one_thread):
    out = tmp_path / "report.html"
    code, stdout, err = run_cli(capsys, "report", runs["cls"], "--compare", runs["scratch"], runs["pre"], runs["t2i"], "--out", out)
    assert code == 0, err
    assert str(out) in stdout
    return out


def _png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))


def test_report_holds_every_section_and_its_pictures(report, runs):
    page = Page(report.read_text(encoding="utf-8"))
    assert page.sections == ["runs", "data", "config", "curves", "evaluation", "confusion", "samples", "t2i-evaluation"]
    assert page.scripts == 0, "no JavaScript"
    assert all(link.startswith("data:") for link in page.links), "no network, no other files"
    for img in page.images:
        assert _png(img["src"]).size[0] > 0 and img.get("alt")
    alts = [img["alt"] for img in page.images]
    # curves per stage, the encoder runs on shared axes: loss, learning rate and the logged metrics
    for metric in ("training: loss", "training: lr", "training: accuracy", "base: loss", "sr1: loss", "sr1: lr"):
        assert metric in alts, metric
    assert "confusion matrix of cls" in alts
    # every sample grid written over training, each stage in step order
    for stage in ("base", "sr1"):
        grids = sorted((runs["t2i"] / stage / "samples").glob("step-*.png"))
        shown = [a for a in alts if a.startswith(f"{stage} samples at step")]
        assert len(grids) == 2 and shown == [f"{stage} samples at step {int(g.stem[5:])}" for g in grids]
    # the before/after table imagen evaluate recorded: this run, the run it started from, the baseline
    before_after = [t for t in page.tables if t["class"] == "before-after"]
    assert len(before_after) == 1
    cells = before_after[0]["cells"]
    assert {"cls", "pre", "cls-scratch", "this run", "from scratch"} <= set(cells)
    recorded = json.loads(next((runs["cls"] / "eval").glob("*-test.json")).read_text())
    assert f"{recorded['accuracy']:.4g}" in cells


def test_report_default_place_and_bad_input(runs, tmp_path, capsys, one_thread):
    code, stdout, err = run_cli(capsys, "report", runs["scratch"])
    assert code == 0, err
    page = Page((runs["scratch"] / "report.html").read_text(encoding="utf-8"))
    assert "curves" in page.sections and "samples" not in page.sections
    code, _, err = run_cli(capsys, "report", tmp_path / "nowhere")
    assert "does not exist" in one_line_error(code, err)
    code, _, err = run_cli(capsys, "report", runs["cls"], "--out", tmp_path)
    assert "is a folder" in one_line_error(code, err)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "report", runs["cls"], "--out", blocker / "r.html")
    one_line_error(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_sample_grids_are_tensorboard_image_summaries(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in ("base", "sr1"):
        events = EventAccumulator(str(runs["t2i"] / stage / "tensorboard"), size_guidance={"images": 0}).Reload()
        assert "samples" in events.Tags()["images"]
        steps = [e.step for e in events.Images("samples")]
        assert steps == [1, 2]
        png = Image.open(io.BytesIO(events.Images("samples")[0].encoded_image_string))
        assert png.size == Image.open(runs["t2i"] / stage / "samples" / "step-000001.png").size


def test_report_opens_in_chromium(report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium package (scripts/install-data.sh does)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(java_script_enabled=True)
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri(), timeout=20_000)
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert widths and all(w > 0 for w in widths), "every picture decodes"
    assert {"Runs", "Data", "Configuration", "Training and validation curves", "Evaluation", "Confusion matrices",
            "Samples over training", "Text-to-image evaluation"} <= set(headings)
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert Image.open(tmp_path / "report.png").size[1] > 1000


def test_image_summaries_reach_wandb(tmp_path, monkeypatch):
    """With --report-to wandb the trainer's image summaries are logged as wandb.Image (a stand-in module here)."""
    import sys
    import types

    import numpy as np

    from imagen.train.loggers import MetricsLogger

    logged = []
    run = types.SimpleNamespace(log=lambda values, step: logged.append((step, values)), finish=lambda: None)
    stub = types.ModuleType("wandb")
    stub.init = lambda **kw: run
    stub.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", stub)
    with MetricsLogger(tmp_path, report_to=("jsonl", "wandb")) as logger:
        logger.log_images(3, {"samples": np.zeros((8, 24, 3), dtype=np.uint8)})
    assert logged == [(3, {"samples": ("image", (8, 24, 3))})]


def test_text_to_image_scores_are_shown(runs, tmp_path, capsys, one_thread):
    """What `imagen evaluate-t2i` records (compositional accuracy, FID, its sample grid) appears in the report."""
    import shutil

    run = tmp_path / "t2i"
    shutil.copytree(runs["t2i"], run)
    scores = {"run": str(run), "data": "shapes", "steps": 25, "sampler": "dpmpp2m", "guidance": 3.0, "image_size": 16,
              "single_accuracy": 0.625, "relation_accuracy": 0.375, "count_accuracy": 0.5, "fid": 123.5, "fid_samples": 64}
    (run / "eval").mkdir()
    (run / "eval" / "t2i-shapes.json").write_text(json.dumps(scores))
    Image.new("RGB", (64, 16), (200, 40, 40)).save(run / "eval" / "t2i-shapes-samples.png")
    code, _, err = run_cli(capsys, "report", run)
    assert code == 0, err
    page = Page((run / "report.html").read_text(encoding="utf-8"))
    assert "t2i-evaluation" in page.sections and "evaluation" in page.sections
    cells = [c for t in page.tables for c in t["cells"]]
    for key, shown in (("single_accuracy", "0.625"), ("relation_accuracy", "0.375"), ("fid", "123.5")):
        i = cells.index(key)
        assert cells[i + 1] == shown
    assert any(img["alt"] == "t2i-shapes-samples.png" for img in page.images)
