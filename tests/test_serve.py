"""`imagen serve`: every endpoint in-process (httpx against the ASGI app), its error codes, batching equality, and
one real server in a subprocess."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import imagen.api as api  # noqa: E402
from imagen.cli import main  # noqa: E402
from imagen.errors import RunError  # noqa: E402
from imagen.serve import BatchSettings, ServeSettings, create_app  # noqa: E402
from imagen.serve.models import load_models  # noqa: E402
from serve_helpers import serve_subprocess, train_tiny_t2i  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "runs"
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    torch.set_num_threads(1)  # tiny models on a busy machine: one thread is the fastest
    root = tmp_path_factory.mktemp("serve-runs")
    t2i, cls = root / "t2i", root / "cls"
    train_tiny_t2i(t2i)
    api.finetune("classify", "shapes", cls, preset="tiny", label="color-shape", n=64, max_steps=2, batch_size=8,
                 progress=False, report_to=("jsonl",))
    return {"t2i": t2i, "cls": cls, "vqa": FIXTURES / "vqa"}


@pytest.fixture(scope="module")
def models(runs):
    return load_models([runs["t2i"], runs["cls"], runs["vqa"], FIXTURES / "retrieval"], device="cpu")


def settings(**kw) -> ServeSettings:
    batch = {k: kw.pop(k) for k in ("max_batch", "max_wait_ms", "queue", "timeout_s") if k in kw}
    return ServeSettings(batch=BatchSettings(**{"max_wait_ms": 5.0, **batch}), device="cpu", **kw)


def serve(models, check, **kw):
    """Run `check(client, app)` (a coroutine function) against an app with its lifespan started."""
    app = create_app(None, settings(**kw), models=models)

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                return await check(client, app)

    return asyncio.run(go())


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def png_bytes(size=(16, 16), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_page_health_ready_models(models):
    async def check(client, app):
        page = await client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        html = page.text
        assert 'id="generate"' in html and 'id="predict"' in html
        assert "https://" not in html and "http://" not in html and "@font-face" not in html  # works offline
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = (await client.get("/readyz")).json()
        assert ready["status"] == "ready" and set(ready["models"]) == {"t2i", "cls", "vqa", "retrieval"}
        listed = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert listed["t2i"]["task"] == "text-to-image" and listed["t2i"]["kind"] == "generate"
        assert listed["t2i"]["options"]["image_size"] == 16
        assert listed["cls"]["task"] == "classify" and listed["cls"]["options"]["inputs"] == []
        assert listed["vqa"]["options"]["inputs"] == ["question"]

    serve(models, check)


@pytest.mark.parametrize("prompt, compose", [("a red circle", False), ("a red circle AND a blue square", True)])
def test_generate_equals_imagen_generate(models, runs, tmp_path, prompt, compose):
    body = {"prompt": prompt, "n": 3, "seed": 7, "steps": 3, "guidance": 2.0, "sampler": "ddpm", "model": "t2i",
            "compose": compose}

    async def check(client, app):
        r = await client.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    answer = serve(models, check)
    assert answer["seed"] == 7 and len(answer["images"]) == 3
    config = api.SamplingConfig(n=3, seed=7, steps=3, guidance=2.0, sampler="ddpm", compose=compose)
    files = api.generate_to_files(runs["t2i"], [prompt], config, out_dir=tmp_path, device="cpu")
    for b64, file in zip(answer["images"], files):
        expected = np.asarray(Image.open(file).convert("RGB"), dtype=np.int16)
        assert pixels(b64).shape == (16, 16, 3)
        assert np.abs(pixels(b64) - expected).max() <= 1  # float sums in another order may round one level apart
    assert len({*answer["images"]}) == 3  # each sample its own noise


def sse(text: str) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a server-sent event stream."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_generate_streams_progress_then_the_result(models):
    body = {"prompt": "a red circle", "n": 2, "seed": 3, "steps": 3, "guidance": 2.0, "model": "t2i"}

    async def check(client, app):
        plain = (await client.post("/v1/generate", json=body)).json()
        async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            streamed = "".join([chunk async for chunk in r.aiter_text()])
        by_accept = await client.post("/v1/generate", json=body, headers={"Accept": "text/event-stream"})
        return plain, streamed, by_accept

    plain, streamed, by_accept = serve(models, check)
    events = sse(streamed)
    stages = models["t2i"].pipeline.stage_names
    assert len(stages) == 2
    expected = [{"step": i, "steps": 3, "stage": stage} for stage in stages for i in range(1, 4)]
    assert [data for kind, data in events[:-1]] == expected and all(kind == "progress" for kind, _ in events[:-1])
    assert events[-1] == ("result", plain)
    assert by_accept.headers["content-type"].startswith("text/event-stream") and sse(by_accept.text)[-1] == ("result", plain)


def test_streamed_requests_in_one_batch_each_get_its_progress(models):
    bodies = [{"prompt": p, "seed": i, "steps": 2, "model": "t2i", "stream": True} for i, p in enumerate(PROMPTS[:3])]

    async def check(client, app):
        batcher, sizes = app.state.batcher, []
        real = batcher.run

        def counted(key, payloads, progress):
            sizes.append(len(payloads))
            return real(key, payloads, progress)

        batcher.run = counted
        answers = await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))
        return [sse(a.text) for a in answers], sizes

    answers, sizes = serve(models, check, max_wait_ms=300)
    assert sizes == [3]  # one batch, and each of its requests hears all its steps
    for events in answers:
        assert [kind for kind, _ in events] == ["progress"] * 4 + ["result"]
        assert [d["step"] for _, d in events[:-1]] == [1, 2, 1, 2]
        assert len(events[-1][1]["images"]) == 1


def test_stream_refused_at_once_is_a_plain_429(models):
    async def check(client, app):
        return await client.post("/v1/generate", json={"prompt": "x", "model": "t2i", "stream": True, "steps": 2})

    r = serve(models, check, queue=0)  # every request finds the queue full
    assert r.status_code == 429 and "Retry-After" in r.headers and "queue is full" in r.json()["error"]


def test_concurrent_requests_are_batched_and_equal_one_at_a_time(models):
    requests = [{"prompt": p, "seed": s, "n": 2, "steps": 3, "model": "t2i"} for p, s in zip(PROMPTS, (0, 1, 2, 3))]

    async def together(client, app):
        answers = await asyncio.gather(*(client.post("/v1/generate", json=b) for b in requests))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        return [r.json()["images"] for r in answers], (await client.get("/metrics")).text

    async def alone(client, app):
        return [(await client.post("/v1/generate", json=b)).json()["images"] for b in requests]

    batched, metrics = serve(models, together, max_batch=8, max_wait_ms=500)
    single = serve(models, alone, max_batch=2, max_wait_ms=0)
    # 8 samples in at most 2 batches (the first may start before the rest arrive), not 4.
    count = next(line for line in metrics.splitlines() if line.startswith('imagen_batch_size_count{model="t2i"}'))
    assert int(count.split()[-1]) <= 2
    for got, want in zip(batched, single):
        for a, b in zip(got, want):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_metrics_text(models):
    async def check(client, app):
        await client.get("/healthz")
        await client.post("/v1/generate", json={"prompt": "a red circle", "steps": 2, "model": "t2i"})
        await client.post("/v1/generate", json={"prompt": "x" * 5000, "model": "t2i"})
        return (await client.get("/metrics"))

    r = serve(models, check)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'imagen_requests_total{endpoint="/v1/generate",code="200"} 1' in text
    assert 'imagen_requests_total{endpoint="/v1/generate",code="422"} 1' in text
    assert 'imagen_request_seconds_bucket{endpoint="/v1/generate",le="+Inf"} 2' in text
    assert 'imagen_batch_size_bucket{model="t2i",le="1"} 1' in text
    assert "# TYPE imagen_request_seconds histogram" in text and "imagen_queue_depth 0" in text


def test_api_key(models):
    async def check(client, app):
        assert (await client.get("/v1/models")).status_code == 401
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert (await client.post("/v1/generate", json={"prompt": "a"})).status_code == 401
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(open_path)).status_code == 200

    serve(models, check, api_key="s3cret")


def test_generate_takes_steps_per_stage(models):
    # A few-step base stage before a super-resolution stage that needs more: each stage reports its own count.
    body = {"prompt": "a red circle", "seed": 3, "steps": 3, "stage_steps": {"base": 2}, "model": "t2i", "stream": True}

    async def check(client, app):
        async with client.stream("POST", "/v1/generate", json=body) as r:
            return "".join([chunk async for chunk in r.aiter_text()])

    events = sse(serve(models, check))
    expected = [{"step": i, "steps": n, "stage": stage} for stage, n in (("base", 2), ("sr1", 3)) for i in range(1, n + 1)]
    assert [data for kind, data in events[:-1]] == expected and events[-1][0] == "result"


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "x" * 1001}, 422, "prompt"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "a", "n": 9}, 422, "n: at most 8"),
    ({"prompt": "a", "n": 0}, 422, "n"),
    ({"prompt": "a", "sampler": "euler"}, 422, "sampler"),
    ({"prompt": "a", "steps": 1001}, 422, "steps"),
    ({"prompt": "a", "steps": 0}, 422, "steps"),
    ({"prompt": "a", "steps": 1000, "sampler": "unipc"}, 422, "steps must be in [1, 996]"),  # skips the cosine tail
    ({"prompt": "a", "stage_steps": {"sr9": 2}}, 422, "has no stage 'sr9'"),
    ({"prompt": "a AND", "compose": True}, 422, "empty part"),
    ({"prompt": "a", "compose": 2}, 422, "compose"),
    ({"prompt": "a", "stage_steps": {"base": 0}}, 422, "stage_steps"),
    ({"prompt": "a", "stage_steps": {f"s{i}": 1 for i in range(17)}}, 422, "stage_steps"),
    ({"prompt": "a", "model": "/etc/passwd"}, 404, "no generate model"),
    ({"prompt": "a", "model": "cls"}, 422, "no generate model"),
    ({"prompt": "a", "out": "/tmp/x.png"}, 422, "out"),  # no field can name a server path
])
def test_generate_limits(models, body, status, words):
    async def check(client, app):
        return await client.post("/v1/generate", json={"model": "t2i", **body})

    r = serve(models, check)
    assert r.status_code == status, r.text
    reason = r.json()["error"]
    assert words in reason and "\n" not in reason


def test_predict_equals_imagen_predict(models, runs, tmp_path):
    picture = tmp_path / "red.png"
    picture.write_bytes(png_bytes())

    async def check(client, app):
        cls = await client.post("/v1/predict", data={"model": "cls", "top_k": "3"},
                                files={"image": ("red.png", picture.read_bytes(), "image/png")})
        vqa = await client.post("/v1/predict", data={"model": "vqa", "question": "what color is the shape?"},
                                files={"image": ("../../red.png", picture.read_bytes(), "image/png")})
        texts = ["a red circle", "a blue square"]
        ranked = await client.post("/v1/predict", data={"model": "retrieval", "texts": texts},
                                   files={"image": ("red.png", picture.read_bytes(), "image/png")})
        return cls, vqa, ranked

    cls, vqa, ranked = serve(models, check)
    want = api.predict(FIXTURES / "retrieval", [picture], texts=["a red circle", "a blue square"])[0]
    assert ranked.status_code == 200 and ranked.json() == {**want, "file": "red.png"}
    assert cls.status_code == 200 and vqa.status_code == 200, (cls.text, vqa.text)
    want = api.predict(runs["cls"], [picture], top_k=3)[0]
    assert cls.json() == {**want, "file": "red.png"}
    want = api.predict(runs["vqa"], [picture], question="what color is the shape?")[0]
    assert vqa.json() == {**want, "file": "red.png"}  # a client's file name is a label, its folders dropped


def test_predict_upload_errors(models):
    big = png_bytes(size=(300, 300))

    async def check(client, app):
        post = lambda data, **form: client.post("/v1/predict", data={"model": "cls", **form},  # noqa: E731
                                                files={"image": ("f.png", data, "image/png")})
        return {
            "not an image": await post(b"hello, not a picture"),
            "empty": await post(b""),
            "too many pixels": await post(big),
            "too many bytes": await post(b"\0" * 3000),
            "question for classify": await post(png_bytes(), question="what?"),
            "unknown model": await post(png_bytes(), model="t2i"),
        }

    answers = serve(models, check, max_pixels=200 * 200, max_upload_bytes=2000)
    expect = {"not an image": 415, "empty": 415, "too many pixels": 413, "too many bytes": 413,
              "question for classify": 422, "unknown model": 422}
    for what, r in answers.items():
        assert r.status_code == expect[what], (what, r.text)
        assert "\n" not in r.json()["error"]
    assert "300 x 300" in answers["too many pixels"].json()["error"]


def test_decompression_bomb_is_413(models):
    # A 20000 x 20000 PNG is ~400 million pixels in a few hundred kilobytes; PIL refuses it before decoding.
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")

    async def check(client, app):
        return await client.post("/v1/predict", data={"model": "cls"}, files={"image": ("b.png", bomb.getvalue(), "image/png")})

    r = serve(models, check)
    assert r.status_code == 413, r.text


def test_full_queue_is_429_and_late_requests_504(models):
    release, calls = threading.Event(), []

    async def check(client, app):
        batcher = app.state.batcher
        real = batcher.run

        def blocked(key, payloads, progress):
            calls.append(len(payloads))
            release.wait(10)
            return real(key, payloads, progress)

        batcher.run = blocked
        body = {"model": "t2i", "prompt": "a red circle", "steps": 2}
        running = asyncio.ensure_future(client.post("/v1/generate", json=body))
        while not calls:  # the first request is on the model thread
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(client.post("/v1/generate", json={**body, "seed": 1}))
        while batcher.waiting < 1:
            await asyncio.sleep(0.01)
        refused = await client.post("/v1/generate", json=body)
        healthy = await client.get("/healthz")
        late = await asyncio.gather(running, waiting)
        release.set()
        return refused, healthy, late, (await client.get("/metrics")).text

    refused, healthy, late, metrics = serve(models, check, queue=1, timeout_s=1.0, max_wait_ms=0)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert healthy.status_code == 200
    assert [r.status_code for r in late] == [504, 504]
    assert calls == [1]  # the request that timed out while waiting never ran
    assert 'imagen_rejections_total{reason="queue_full"} 1' in metrics
    assert 'imagen_rejections_total{reason="timeout"} 2' in metrics


def test_unfinished_run_refused_at_start(runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((runs["cls"] / "config.json").read_text())
    with pytest.raises(RunError, match="not a finished run"):
        load_models([unfinished])
    assert main(["serve", "--run", str(unfinished), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("imagen serve: error:") and "not a finished run" in err and "\n" not in err
    assert main(["serve", "--run", str(FIXTURES / "pretrain")]) == 2
    assert "fine-tuned" in capsys.readouterr().err
    assert main(["serve", "--run", str(runs["cls"]), "--api-key-env", "IMAGEN_TEST_UNSET_KEY"]) == 2
    assert "IMAGEN_TEST_UNSET_KEY" in capsys.readouterr().err


def test_real_server_in_a_subprocess(runs):
    with serve_subprocess(runs["t2i"], "--api-key-env", "IMAGEN_KEY", env={"IMAGEN_KEY": "k3y"}) as (proc, base):
        r = httpx.post(base + "/v1/generate", json={"prompt": "a red circle", "n": 2, "steps": 2},
                       headers={"Authorization": "Bearer k3y"}, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["images"]) == 2 and pixels(r.json()["images"][0]).shape == (16, 16, 3)
        # A client that goes away stops its batch: 2 stages x 1000 steps would take a minute.
        long = {"prompt": "a red circle", "n": 8, "steps": 1000}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(base + "/v1/generate", json=long, headers={"Authorization": "Bearer k3y"}, timeout=0.5)
        wait_for_metric(base, CANCELLED_METRIC, 1)
        with httpx.stream("POST", base + "/v1/generate", json={**long, "stream": True},
                          headers={"Authorization": "Bearer k3y"}, timeout=30) as stream:
            assert next(stream.iter_lines()) == "event: progress"  # then the client closes the connection
        text = wait_for_metric(base, CANCELLED_METRIC, 2)
        assert metric(text, STEPS_METRIC) < 1000 and 'imagen_requests_total{endpoint="/v1/generate",code="499"} 1' in text
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        logged = [json.loads(line) for line in err.splitlines() if '"path"' in line]  # one JSON object a line
        assert [line["status"] for line in logged if line["path"] == "/v1/generate"] == [200, 499, 200]


def metric(text: str, name: str) -> float:
    """The value of one sample line of Prometheus text (0 when absent)."""
    line = next((line for line in text.splitlines() if line.startswith(name + " ")), None)
    return float(line.split()[-1]) if line is not None else 0.0


def slowed(batcher, seconds: float):
    """Make every sampling step of `batcher`'s batches take at least `seconds` more."""
    import time

    real = batcher.run

    def run(key, payloads, progress):
        def slow_progress(*event):
            time.sleep(seconds)
            progress(*event)

        return real(key, payloads, slow_progress)

    batcher.run = run


async def idle(batcher):
    """Wait until no batch runs (at most 20 s)."""
    for _ in range(2000):
        if not batcher.running and not batcher.waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the batch is still running")


STEPS_METRIC = 'imagen_sampling_steps_total{model="t2i"}'
CANCELLED_METRIC = 'imagen_cancelled_batches_total{model="t2i"}'


def test_a_batch_whose_requests_all_timed_out_stops_between_steps(models):
    async def check(client, app):
        batcher = app.state.batcher
        real = batcher.run
        slowed(batcher, 0.02)
        body = {"model": "t2i", "prompt": "a red circle", "steps": 200}  # 2 stages: 400 steps, 8 s at least
        late = await client.post("/v1/generate", json=body)
        await idle(batcher)
        after_timeout = (await client.get("/metrics")).text
        batcher.run = real
        nxt = await client.post("/v1/generate", json={**body, "steps": 2})
        return late, after_timeout, nxt, (await client.get("/metrics")).text

    late, after_timeout, nxt, final = serve(models, check, timeout_s=1.0, max_wait_ms=0)
    assert late.status_code == 504 and "no answer within 1 s" in late.json()["error"]
    assert metric(after_timeout, CANCELLED_METRIC) == 1
    ran = metric(after_timeout, STEPS_METRIC)
    assert 1 <= ran < 400  # stopped before its last step
    assert nxt.status_code == 200 and len(nxt.json()["images"]) == 1  # the server goes on
    assert metric(final, STEPS_METRIC) == ran + 4 and metric(final, CANCELLED_METRIC) == 1


def test_a_batch_runs_on_while_one_of_its_requests_waits(models):
    """Of two requests in one batch, one client goes away: the other gets its whole answer, equal to the one it gets
    alone; when both go away, the batch stops."""
    steps = 10
    body = {"model": "t2i", "prompt": "a blue square", "steps": steps}

    async def check(client, app):
        batcher = app.state.batcher
        slowed(batcher, 0.01)
        sizes, real = [], batcher.run

        def counted(key, payloads, progress):
            sizes.append(len(payloads))
            return real(key, payloads, progress)

        batcher.run = counted
        going = asyncio.ensure_future(client.post("/v1/generate", json={**body, "seed": 1}))
        staying = asyncio.ensure_future(client.post("/v1/generate", json={**body, "seed": 2}))
        while not batcher.running:
            await asyncio.sleep(0.01)
        going.cancel()  # its client goes away mid-batch
        kept = await staying
        await idle(batcher)
        both = [asyncio.ensure_future(client.post("/v1/generate", json={**body, "seed": s})) for s in (3, 4)]
        while not batcher.running:
            await asyncio.sleep(0.01)
        for request in both:
            request.cancel()
        await asyncio.gather(*both, return_exceptions=True)
        await idle(batcher)
        alone = await client.post("/v1/generate", json={**body, "seed": 2})
        return sizes, kept, alone, (await client.get("/metrics")).text

    sizes, kept, alone, text = serve(models, check, max_wait_ms=300)
    assert sizes == [2, 2, 1]
    assert kept.status_code == 200 and len(kept.json()["images"]) == 1
    assert np.abs(pixels(kept.json()["images"][0]) - pixels(alone.json()["images"][0])).max() <= 1
    # the first batch ran all its 2 x 10 steps, the second stopped early, the last ran 20
    assert metric(text, CANCELLED_METRIC) == 1 and 40 < metric(text, STEPS_METRIC) < 60


def wait_for_metric(base: str, name: str, value: float) -> str:
    """/metrics once `name` reads `value` (at most 30 s)."""
    for _ in range(300):
        text = httpx.get(base + "/metrics", timeout=5).text
        if metric(text, name) == value:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{name} is {metric(text, name)}, not {value}")
