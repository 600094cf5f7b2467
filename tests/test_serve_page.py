"""The page of `imagen serve` in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright through
its executable path) loads `/`, generates from a prompt, and a picture appears; uploads a picture to a detect run, and
its boxes are drawn on it. CI installs both
(scripts/install-data.sh installs chromium, the `test` extra playwright); elsewhere the test is skipped."""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import imagen.api as api  # noqa: E402
from serve_helpers import serve_subprocess, train_tiny_t2i  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def sync_playwright():
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium package (scripts/install-data.sh does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no playwright Python package: pip install -e '.[test]'")
    return sync_playwright


@contextlib.contextmanager
def served_page(run: Path):
    """(page, errors): headless Chromium on `/` of `imagen serve RUN` in a subprocess; errors collects the page's
    uncaught JavaScript errors. The browser and the server stop when the block ends."""
    playwright = sync_playwright()
    with serve_subprocess(run) as (proc, base), playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/", timeout=20_000)
            yield page, errors
        finally:
            browser.close()


def test_page_generates_a_picture_in_chromium(tmp_path):
    sync_playwright()  # skips before training when the browser is missing
    import torch

    torch.set_num_threads(1)
    run = train_tiny_t2i(tmp_path / "t2i")
    with served_page(run) as (page, errors):
        page.wait_for_selector("#generate-form:not(.hidden)", timeout=10_000)
        page.fill("#prompt", "a blue square")
        page.fill("#n", "2")
        page.fill("#steps", "3")
        page.evaluate("""() => {  // every text the progress label shows, however briefly: each textContent set
            // adds a new text node, so the records keep every value even when one callback batches several events
            window.labels = [];
            new MutationObserver(records => records.forEach(r => r.type === "characterData"
                    ? window.labels.push(r.target.data)
                    : r.addedNodes.length ? r.addedNodes.forEach(n => window.labels.push(n.textContent))
                                          : window.labels.push("")))
                .observe(document.getElementById("progress-label"), {childList: true, characterData: true, subtree: true});
        }""")
        page.click("#generate")
        page.wait_for_selector("#images img[src^='data:image/png;base64,']", timeout=20_000)
        page.wait_for_function("() => [...document.querySelectorAll('#images img')].every(i => i.complete)",
                               timeout=10_000)
        widths = page.eval_on_selector_all("#images img", "imgs => imgs.map(i => i.naturalWidth)")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        status = page.text_content("#status")
        labels = page.evaluate("() => window.labels")
        bar_hidden = page.is_hidden("#progress-box")
        # The compose switch reaches the server: a composed prompt with an empty part is refused, in one line.
        page.fill("#prompt", "a blue square AND")
        page.check("#compose")
        page.click("#generate")
        page.wait_for_selector("#status.error", timeout=10_000)
        refused = page.text_content("#status")
    assert refused.startswith("422") and "empty part" in refused, refused
    assert len(widths) == 2 and all(w == 16 for w in widths), (widths, status)
    assert "2 picture(s)" in status and not errors
    # the progress bar went through the sampling steps of both stages (server-sent events), then hid itself
    assert [label for label in labels if label][-1].startswith("stage 2 (") and labels[-1].endswith("step 3 / 3")
    assert "stage 1 (base): step 1 / 3" in labels and bar_hidden
    assert (tmp_path / "page.png").stat().st_size > 0


def test_page_draws_detect_boxes_on_the_picture_in_chromium(tmp_path):
    sync_playwright()  # skips before training when the browser is missing
    import torch

    torch.set_num_threads(1)
    run = tmp_path / "detect"
    # 2 steps learn nothing; predict_threshold 0 makes the run answer its 8 best boxes, enough to draw
    api.finetune("detect", "shapes", run, preset="tiny", n=32, max_steps=2, batch_size=8, predict_threshold=0.0,
                 max_detections=8, progress=False, report_to=("jsonl",))
    picture = tmp_path / "scene.png"  # not square and not the model's size: boxes come back in its own pixels
    img = Image.new("RGB", (40, 24), (16, 16, 16))
    ImageDraw.Draw(img).rectangle([4, 4, 14, 14], fill=(220, 40, 40))
    ImageDraw.Draw(img).ellipse([22, 8, 34, 20], fill=(40, 80, 220))
    img.save(picture)
    with served_page(run) as (page, errors):
        page.wait_for_selector("#predict-form:not(.hidden)", timeout=10_000)
        assert page.is_visible("#min-score") and not page.is_visible("#question")
        page.set_input_files("#image", str(picture))
        page.click("#predict")
        page.wait_for_selector("#result-box:not(.hidden)", timeout=20_000)
        assert page.locator("#figure .box").count() == 0  # below the page's default threshold, 0.3
        answer = json.loads(page.text_content("#result"))
        counts = {}
        for threshold in (0.0, statistics.median(d["score"] for d in answer["detections"]), 1.0):
            page.fill("#min-score", repr(threshold))
            counts[threshold] = (page.locator("#figure .box").count(), page.locator("#labels li").count(),
                                 sum(d["score"] >= threshold for d in answer["detections"]))
        page.fill("#min-score", "0")
        # each box's place on the screen, mapped back to the picture's own pixels
        placed = page.evaluate("""() => {
            const img = document.getElementById("picture").getBoundingClientRect();
            const natural = document.getElementById("picture");
            const sx = natural.naturalWidth / img.width, sy = natural.naturalHeight / img.height;
            return [...document.querySelectorAll("#figure .box")].map((b) => {
                const r = b.getBoundingClientRect();
                return {box: [(r.left - img.left) * sx, (r.top - img.top) * sy, (r.right - img.left) * sx,
                              (r.bottom - img.top) * sy],
                        text: b.textContent, shown: [img.width, img.height]};
            });
        }""")
        page.screenshot(path=str(tmp_path / "detect-page.png"), full_page=True)
    assert not errors, errors
    detections = answer["detections"]
    assert answer["file"] == "scene.png" and len(detections) == 8
    for threshold, (boxes, listed, above) in counts.items():
        assert boxes == listed == above, (threshold, boxes, listed, above)
    assert 0 < counts[statistics.median(d["score"] for d in detections)][0] < 8 and counts[1.0][0] == 0
    assert len(placed) == 8 and placed[0]["shown"] == [256, round(24 * 256 / 40)]  # scaled up, the shape kept
    for d, shown in zip(detections, placed):
        assert max(abs(a - b) for a, b in zip(shown["box"], d["box"])) < 0.5, (shown, d)
        assert shown["text"] == f"{d['label']} {d['score']:.2f}"
    assert (tmp_path / "detect-page.png").stat().st_size > 0
