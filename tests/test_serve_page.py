"""The page of `imagen serve` in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright through
its executable path) loads `/`, generates from a prompt, and a picture appears. CI installs both
(scripts/install-data.sh installs chromium, the `test` extra playwright); elsewhere the test is skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

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


def test_page_generates_a_picture_in_chromium(tmp_path):
    playwright = sync_playwright()
    import torch

    torch.set_num_threads(1)
    run = train_tiny_t2i(tmp_path / "t2i")
    with serve_subprocess(run) as (proc, base), playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/", timeout=20_000)
            page.wait_for_selector("#generate-form:not(.hidden)", timeout=10_000)
            page.fill("#prompt", "a blue square")
            page.fill("#n", "2")
            page.fill("#steps", "3")
            page.evaluate("""() => {  // every text the progress label shows, however briefly
                window.labels = [];
                new MutationObserver(() => window.labels.push(document.getElementById("progress-label").textContent))
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
        finally:
            browser.close()
    assert len(widths) == 2 and all(w == 16 for w in widths), (widths, status)
    assert "2 picture(s)" in status and not errors
    # the progress bar went through the sampling steps of both stages (server-sent events), then hid itself
    assert [label for label in labels if label][-1].startswith("stage 2 (") and labels[-1].endswith("step 3 / 3")
    assert "stage 1 (base): step 1 / 3" in labels and bar_hidden
    assert (tmp_path / "page.png").stat().st_size > 0
