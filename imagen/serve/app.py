"""The HTTP API of `imagen serve`: a FastAPI app over finished runs, with dynamic batching, auth and limits.

    GET  /            the page (static/index.html): generate from a prompt, or upload a picture to predict
    GET  /healthz     alive;  GET /readyz  models loaded;  GET /metrics  Prometheus text
    GET  /v1/models   the loaded runs, their tasks and options
    POST /v1/generate JSON {prompt, negative, compose, n, seed, steps, stage_steps, guidance, sampler, model} -> {images: [base64 PNG], seed}
                      with "stream": true (or Accept: text/event-stream): server-sent events, `event: progress`
                      {step, steps, stage} after every sampling step of the batch, then `event: result` (the same
                      JSON) or `event: error` {error, status}
    POST /v1/predict  multipart image + question / instruction / texts + model -> what `imagen predict --json` prints

A request names a model by its name in /v1/models, never by a path, so no request can reach a server file.
A request whose client closes the connection before its answer is dropped like one that timed out (logged as 499).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import Headers
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

import imagen.api as api
from imagen.config import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_SAMPLING_STEPS, SAMPLER_NAMES
from imagen.data import to_rgb
from imagen.errors import USER_ERRORS
from imagen.serve.batching import Batcher, BatchSettings, QueueFull, Timeout
from imagen.serve.metrics import Metrics
from imagen.serve.models import PREDICT_INPUTS, ServedModel, follow_current, load_models, run_generate, run_predict

log = logging.getLogger("imagen.serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeSettings:
    """How a server batches and what it accepts; the limits bound what one request can cost."""

    batch: BatchSettings = field(default_factory=BatchSettings)
    api_key: str | None = None  # with a key, every /v1/* request needs "Authorization: Bearer <key>"
    device: str = "auto"
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 16 * 10**6  # decoded size of an upload; more is a decompression bomb (413)
    max_prompt_chars: int = 1000
    max_n: int = 8  # pictures per request
    max_top_k: int = 20


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    negative: str | None = None
    compose: bool = False  # the prompt is parts joined by " AND ", sampled as their conjunction
    n: int = Field(default=1, ge=1)
    seed: int = Field(default=0, ge=0, lt=2**63)
    steps: int = Field(default=DEFAULT_SAMPLING_STEPS, ge=1, le=1000)
    stage_steps: dict[str, Annotated[int, Field(ge=1, le=1000)]] = Field(default_factory=dict, max_length=16)  # {"base": 8}
    guidance: float = Field(default=DEFAULT_GUIDANCE, ge=0, le=100)
    sampler: str = DEFAULT_SAMPLER
    model: str | None = None
    stream: bool = False  # answer with server-sent events: progress, then the result


class RequestError(Exception):
    """A request refused with an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers


def _error(status: int, reason: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded file as an RGB image: 413 over `max_pixels` (checked before decoding), 415 if not an image."""
    if not data:
        raise RequestError(415, "the uploaded file is empty; send a PNG or JPEG picture")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > max_pixels:
                    raise RequestError(413, f"the picture is {img.width} x {img.height}, over the limit of "
                                            f"{max_pixels} pixels; send a smaller one")
                img.load()
                return to_rgb(img).copy()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(413, f"the picture is too large to decode ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # PIL raises many types for data that is not a picture
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RequestError(415, f"the uploaded file is not a picture PIL can read ({reason}); send a PNG or JPEG") from None


def create_app(runs, settings: ServeSettings | None = None, models: dict[str, ServedModel] | None = None,
               registries=()) -> FastAPI:
    """The app serving `runs` (finished run directories, loaded now: RunError for one that is not finished) and the
    current versions of `registries`; `models` (already loaded, as from `load_models`) skips the loading."""
    settings = settings or ServeSettings()
    models = models if models is not None else load_models(runs, settings.device, registries)

    def run_batch(key, payloads, progress=None):
        kind, name, options = key
        # A registry's model follows its `current` link: a promoted version answers from the next batch on.
        models[name] = follow_current(models[name], settings.device)
        if kind == "generate":
            def report(stage, step, steps):  # after every sampling step; raises when the batch is to stop
                metrics.step(name)
                if progress is not None:
                    progress({"step": step, "steps": steps, "stage": stage})

            return run_generate(models[name], options, payloads, progress=report)
        return run_predict(models[name], dict(options), payloads)

    metrics: Metrics

    def on_batch(key, rows):
        metrics.batch(key[1], rows)

    def on_cancel(key):
        metrics.cancel(key[1])

    batcher = Batcher(run_batch, settings.batch, on_batch=on_batch, on_cancel=on_cancel)
    metrics = Metrics(queue_depth=lambda: batcher.waiting, running=lambda: batcher.running)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        app.state.ready = True
        yield
        app.state.ready = False
        await batcher.stop()  # uvicorn has already finished the requests in flight

    app = FastAPI(title="imagen", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ready = False
    app.state.batcher, app.state.metrics, app.state.models, app.state.settings = batcher, metrics, models, settings

    app.add_middleware(GuardAndLog, api_key=settings.api_key, max_upload_bytes=settings.max_upload_bytes, metrics=metrics)

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return _error(exc.status, exc.reason, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request"))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not app.state.ready:
            return _error(503, "starting: the models are not loaded yet")
        return {"status": "ready", "models": list(models)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"models": [m.describe() for m in models.values()]}

    def pick(name: str | None, generates: bool) -> ServedModel:
        kind = "generate" if generates else "predict"
        fitting = [m for m in models.values() if m.generates == generates]
        if name is None:
            if len(fitting) == 1:
                return fitting[0]
            raise RequestError(422, f"model: name one of the loaded {kind} models: " + (", ".join(m.name for m in fitting) or "none"))
        model = models.get(name)
        if model is None or model.generates != generates:
            raise RequestError(422 if model is not None else 404,
                               f"model: no {kind} model named {name!r}; loaded: " + (", ".join(m.name for m in fitting) or "none"))
        return model

    async def submit(key, payload, rows, progress=None, request: Request | None = None):
        """The answer of a batched request; with `request`, a client that closes the connection drops it (499)."""
        try:
            work = batcher.submit(key, payload, rows, progress)
            return await (work if request is None else _unless_gone(work, request))
        except QueueFull:
            metrics.reject("queue_full")
            retry = max(1, round(settings.batch.max_wait_ms / 1000 + 1))
            raise RequestError(429, f"the queue is full ({settings.batch.queue} requests waiting); retry later",
                               {"Retry-After": str(retry)}) from None
        except Timeout:
            metrics.reject("timeout")
            raise RequestError(504, f"no answer within {settings.batch.timeout_s:g} s; the request was dropped") from None
        except USER_ERRORS as exc:
            raise RequestError(422, str(exc)) from None

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request):
        if len(body.prompt) > settings.max_prompt_chars or len(body.negative or "") > settings.max_prompt_chars:
            raise RequestError(422, f"prompt: at most {settings.max_prompt_chars} characters")
        if body.n > settings.max_n:
            raise RequestError(422, f"n: at most {settings.max_n} pictures per request, got {body.n}")
        if body.sampler not in SAMPLER_NAMES:
            raise RequestError(422, f"sampler: one of {', '.join(SAMPLER_NAMES)}, got {body.sampler!r}")
        model = pick(body.model, generates=True)
        try:
            config = api.SamplingConfig(sampler=body.sampler, steps=body.steps, stage_steps=body.stage_steps, guidance=body.guidance,
                                        negative=body.negative or None, compose=body.compose)
            model.pipeline.check_config(config, prompts=[body.prompt.strip()])
        except USER_ERRORS as exc:
            raise RequestError(422, str(exc)) from None
        key, payload = ("generate", model.name, config), (body.prompt.strip(), body.seed, body.n)
        if not (body.stream or "text/event-stream" in request.headers.get("accept", "")):
            images = await submit(key, payload, body.n, request=request)
            return {"images": images, "seed": body.seed, "model": model.name}
        return await stream_generate(key, payload, body, model.name)

    async def stream_generate(key, payload, body: GenerateRequest, name: str):
        """Server-sent events of one generate request. A refusal that comes at once (a full queue) is still a plain
        429; one that comes later (504, 422) is an `error` event, the 200 having gone out with the first event."""
        events: asyncio.Queue = asyncio.Queue()

        async def work():
            try:
                images = await submit(key, payload, body.n, lambda data: events.put_nowait(("progress", data)))
            except RequestError as exc:
                events.put_nowait(("error", {"error": exc.reason, "status": exc.status}))
                raise
            events.put_nowait(("result", {"images": images, "seed": body.seed, "model": name}))

        task = asyncio.ensure_future(work())
        await asyncio.sleep(0)  # the task runs up to its first wait: a full queue refuses it by then
        if task.done() and task.exception() is not None:
            raise task.exception()

        async def lines():
            try:
                while True:
                    kind, data = await events.get()
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    if kind != "progress":
                        break
            finally:
                if not task.done():
                    task.cancel()  # the client went away: the request's work is dropped
                with contextlib.suppress(asyncio.CancelledError, RequestError):
                    await task

        return StreamingResponse(lines(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/predict")
    async def predict(request: Request, image: UploadFile = File(...), model: str | None = Form(None), question: str | None = Form(None),
                      instruction: str | None = Form(None), texts: list[str] | None = Form(None), top_k: int = Form(1)):
        served = pick(model, generates=False)
        if not 1 <= top_k <= settings.max_top_k:
            raise RequestError(422, f"top_k: between 1 and {settings.max_top_k}, got {top_k}")
        inputs = {k: v for k, v in dict(question=question, instruction=instruction, texts=texts).items() if v}
        too_long = [k for k, v in inputs.items() if sum(map(len, v if isinstance(v, list) else [v])) > settings.max_prompt_chars]
        if too_long:
            raise RequestError(422, f"{too_long[0]}: at most {settings.max_prompt_chars} characters")
        data = await image.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            metrics.reject("too_large")
            raise RequestError(413, f"the upload is over the limit of {settings.max_upload_bytes} bytes")
        try:
            picture = decode_upload(data, settings.max_pixels)
        except RequestError as exc:
            if exc.status == 413:
                metrics.reject("too_large")
            raise
        accepted = [k for k in PREDICT_INPUTS if k in served.describe()["options"]["inputs"]]
        unused = [k for k in inputs if k not in accepted]
        if unused:
            raise RequestError(422, f"{unused[0]}: does not apply to {served.name}, a {served.task} model "
                                    f"(it takes: {', '.join(accepted) or 'the image only'})")
        options = {**{k: tuple(v) if isinstance(v, list) else v for k, v in inputs.items()}, "top_k": top_k}
        key = ("predict", served.name, tuple(sorted(options.items())))  # hashable: requests that can share a batch
        name = Path(image.filename or "upload").name  # only a label for the answer's "file"
        return await submit(key, (picture, name), 1, request=request)

    return app


async def _unless_gone(work, request: Request):
    """The result of `work`, unless the client closes the connection first: then `work` is cancelled (the batcher
    drops the request) and the answer is a 499, which nobody reads but the log and /metrics. A streamed answer needs
    no watch: its next event fails to send, and that drops it."""

    async def gone():
        # the body has been read by now, so the only message left to come is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise RequestError(499, "the client closed the connection; the request was dropped")
    return task.result()


ENDPOINTS = {"/", "/healthz", "/readyz", "/metrics", "/v1/models", "/v1/generate", "/v1/predict"}


def _check_auth(headers: Headers, api_key: str | None) -> JSONResponse | None:
    """None when the request may go on; a 401 otherwise (constant-time comparison of the key)."""
    if api_key is None:
        return None
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode()):
        return None
    return _error(401, "missing or wrong API key; send Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"})


class GuardAndLog:
    """Every HTTP request: /v1/* needs the API key (401) and a body under the limit (413, from Content-Length); then
    one JSON log line and the request metrics, once the answer has been sent. A plain ASGI middleware: Starlette's
    @app.middleware("http") costs a task group and a memory stream per request, more than a small model's forward."""

    def __init__(self, app, api_key: str | None, max_upload_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path, status = scope["path"], 500  # 500 unless an answer starts

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = None
            if path.startswith("/v1/"):
                headers = Headers(scope=scope)
                refusal = _check_auth(headers, self.api_key)
                length = headers.get("content-length")
                # 64 KiB over the upload limit leaves room for a multipart request's other fields
                if refusal is None and length and length.isdigit() and int(length) > self.max_upload_bytes + 65536:
                    self.metrics.reject("too_large")
                    refusal = _error(413, f"the request is {int(length)} bytes, over the limit of {self.max_upload_bytes}")
            await (refusal or self.app)(scope, receive, send_noting_status)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.request(path if path in ENDPOINTS else "other", status, seconds)
            client = scope.get("client")
            log.info(json.dumps({"time": round(time.time(), 3), "method": scope["method"], "path": path, "status": status,
                                 "ms": round(seconds * 1000, 1), "client": client[0] if client else None}))
