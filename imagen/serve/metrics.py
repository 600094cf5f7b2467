"""Prometheus text-format metrics, written by hand: request counts, latency and batch-size histograms, queue depth,
rejections, sampling steps run and batches cancelled (https://prometheus.io/docs/instrumenting/exposition_formats/)."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{upper:g}"}} {n}' for upper, n in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]


class Metrics:
    """Everything /metrics shows; `queue_depth` and `running` are read when the text is written."""

    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int]):
        self.lock = threading.Lock()
        self.requests = defaultdict(int)  # (endpoint, code) -> count
        self.latency = defaultdict(lambda: Histogram(LATENCY_BUCKETS))  # endpoint -> seconds
        self.batches = defaultdict(lambda: Histogram(BATCH_BUCKETS))  # model -> rows per batch
        self.rejections = defaultdict(int)  # reason -> count
        self.steps = defaultdict(int)  # model -> sampling steps run (one step of one batch, every stage counted)
        self.cancelled = defaultdict(int)  # model -> batches stopped before their end: nobody waited for them
        self.queue_depth = queue_depth
        self.running = running

    def request(self, endpoint: str, code: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, code)] += 1
            self.latency[endpoint].observe(seconds)

    def batch(self, model: str, rows: int) -> None:
        with self.lock:
            self.batches[model].observe(rows)

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejections[reason] += 1

    def step(self, model: str) -> None:
        with self.lock:
            self.steps[model] += 1

    def cancel(self, model: str) -> None:
        with self.lock:
            self.cancelled[model] += 1

    def text(self) -> str:
        with self.lock:
            lines = ["# HELP imagen_requests_total HTTP requests by endpoint and status code.",
                     "# TYPE imagen_requests_total counter"]
            lines += [f'imagen_requests_total{{endpoint="{e}",code="{c}"}} {n}' for (e, c), n in sorted(self.requests.items())]
            lines += ["# HELP imagen_request_seconds Request latency in seconds.", "# TYPE imagen_request_seconds histogram"]
            for endpoint, h in sorted(self.latency.items()):
                lines += h.lines("imagen_request_seconds", f'endpoint="{endpoint}"')
            lines += ["# HELP imagen_batch_size Rows (samples or images) run together per batch.",
                      "# TYPE imagen_batch_size histogram"]
            for model, h in sorted(self.batches.items()):
                lines += h.lines("imagen_batch_size", f'model="{model}"')
            lines += ["# HELP imagen_rejections_total Requests refused: queue_full (429), timeout (504), too_large (413).",
                      "# TYPE imagen_rejections_total counter"]
            lines += [f'imagen_rejections_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejections.items())]
            lines += ["# HELP imagen_sampling_steps_total Sampling steps run (one step of one batch; each stage counts).",
                      "# TYPE imagen_sampling_steps_total counter"]
            lines += [f'imagen_sampling_steps_total{{model="{m}"}} {n}' for m, n in sorted(self.steps.items())]
            lines += ["# HELP imagen_cancelled_batches_total Batches stopped between sampling steps because every "
                      "request in them had timed out or gone away.", "# TYPE imagen_cancelled_batches_total counter"]
            lines += [f'imagen_cancelled_batches_total{{model="{m}"}} {n}' for m, n in sorted(self.cancelled.items())]
            lines += ["# HELP imagen_queue_depth Requests waiting for a batch.", "# TYPE imagen_queue_depth gauge",
                      f"imagen_queue_depth {self.queue_depth()}",
                      "# HELP imagen_running Requests in the batch being run.", "# TYPE imagen_running gauge",
                      f"imagen_running {self.running()}"]
        return "\n".join(lines) + "\n"
