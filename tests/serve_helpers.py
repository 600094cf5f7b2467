"""Shared by the serving tests: a tiny text-to-image run, a free port, and `imagen serve` in a subprocess."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import imagen.api as api

REPO = Path(__file__).parents[1]


def train_tiny_t2i(out: Path) -> Path:
    """A two-stage (8 -> 16 px) text-to-image run trained for 2 steps: seconds on a CPU."""
    api.train_t2i("shapes", out, sizes=(8, 16), n=32, max_steps=2, sr_max_steps=2, text_encoder="trainable",
                  sets=("base.unet.dim=16", "base.unet.num_heads=2", "sr1.unet.dim=16", "sr1.unet.num_heads=2"),
                  progress=False, batch_size=8)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_subprocess(run: Path, *args: str, env: dict[str, str] | None = None, ready_s: float = 60):
    """`python -m imagen serve --run RUN --port FREE ARGS` until it answers /healthz: yields (proc, base URL).
    The caller may stop it (SIGTERM) itself; one still running at the end is killed."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "imagen", "serve", "--run", str(run), "--port", str(port),
                             "--device", "cpu", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read() if proc.poll() is not None else "no answer")
            time.sleep(0.2)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
