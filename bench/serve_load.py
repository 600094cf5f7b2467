"""Bounded load against `imagen serve` on 127.0.0.1: latency percentiles, requests/s and errors, batching on vs off.

    python bench/serve_load.py [--requests 32] [--steps 10] [--time-cap 120] [--runs DIR]

Trains a demo-sized cascade (16px base + 32px SR, a few steps: the weights do not change the cost) and a tiny
classifier into --runs unless they are there, then starts two servers (batching: --max-batch 16, off: --max-batch 1)
and sends each in turn a fixed number of /v1/generate and /v1/predict requests at concurrency 1, 4 and 16, and finally
an overload at 10x the queue (only 200 and 429 may come back, and /healthz must still answer). Every phase stops
by itself: after its requests, or at --time-cap seconds. Prints a markdown table for bench/RESULTS.md, with the
rows run per batch (from /metrics) and the server's CPU time per request beside the latencies and requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_runs(root: Path) -> tuple[Path, Path]:
    import imagen.api as api

    t2i, cls = root / "text-to-image", root / "classify"
    if not (t2i / "sr1" / "model.safetensors").is_file():
        api.train_t2i("shapes", t2i, sizes=(16, 32), n=64, max_steps=2, sr_max_steps=2, text_encoder="trainable",
                      progress=False, batch_size=8)
    if not (cls / "model.safetensors").is_file():
        api.finetune("classify", "shapes", cls, n=64, max_steps=2, batch_size=8, progress=False, report_to=("jsonl",))
    return t2i, cls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs, max_batch: int, queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "imagen", "serve", *[a for r in runs for a in ("--run", str(r))], "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", "20", "--queue", str(queue), "--timeout-s", "120", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


async def load(base: str, kind: str, n: int, concurrency: int, steps: int, cap: float) -> dict:
    picture = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(picture, format="PNG")
    latencies, codes, todo = [], [], list(range(n))
    deadline = time.monotonic() + cap

    async def worker(client):
        while todo and time.monotonic() < deadline:
            i = todo.pop()
            start = time.perf_counter()
            if kind == "generate":
                r = await client.post("/v1/generate", json={"prompt": "a red circle", "seed": i, "steps": steps,
                                                            "model": "text-to-image"})
            else:
                r = await client.post("/v1/predict", data={"model": "classify"},
                                      files={"image": ("red.png", picture.getvalue(), "image/png")})
            latencies.append(time.perf_counter() - start)
            codes.append(r.status_code)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=cap + 10) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    ok = sorted(t for t, c in zip(latencies, codes) if c == 200)
    pct = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] * 1000 if ok else float("nan")  # noqa: E731
    return {"n": len(codes), "ok": len(ok), "errors": len(codes) - len(ok), "rps": len(ok) / seconds,
            "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "codes": sorted(set(codes))}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; nan elsewhere). On a shared machine the server's
    CPU per request is a steadier figure than requests/s, which moves with the other jobs' load."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_rows(base: str) -> tuple[float, int]:
    """Rows and batches run so far, summed over the models (from /metrics: imagen_batch_size)."""
    rows = batches = 0
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("imagen_batch_size_sum"):
            rows += float(line.split()[-1])
        elif line.startswith("imagen_batch_size_count"):
            batches += int(line.split()[-1])
    return rows, batches


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32, help="requests per phase")
    p.add_argument("--steps", type=int, default=10, help="sampling steps per /v1/generate")
    p.add_argument("--time-cap", type=float, default=120.0, help="seconds per phase at most")
    p.add_argument("--queue", type=int, default=8, help="the server's --queue (the overload sends 10x as many at once)")
    p.add_argument("--runs", type=Path, default=Path("runs/bench-serve"))
    args = p.parse_args()
    runs = make_runs(args.runs)
    rows, rps, cpu_ms = [], {}, {}
    # Both servers are up at once and each phase runs on one, then at once on the other: the two figures of a ratio
    # are taken minutes closer than with one server after the other (an idle server costs nothing).
    servers = {}
    try:
        for label, max_batch in (("batching", 16), ("off", 1)):
            servers[label] = start_server(runs, max_batch, queue=max(args.queue, 64))
        for kind in ("generate", "predict"):
            for conc in (1, 4, 16):
                for label, (proc, base) in servers.items():
                    before, cpu = batch_rows(base), cpu_seconds(proc.pid)
                    r = asyncio.run(load(base, kind, args.requests, conc, args.steps, args.time_cap))
                    after, cpu = batch_rows(base), cpu_seconds(proc.pid) - cpu
                    per_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                    rps[(label, kind, conc)] = r["rps"]
                    cpu_ms[(label, kind, conc)] = 1000 * cpu / max(r["ok"], 1)
                    rows.append(f"| {kind} | {label} | {conc} | {r['n']} | {r['rps']:.2f} | {r['p50']:.0f} | {r['p95']:.0f} | "
                                f"{r['p99']:.0f} | {per_batch:.1f} | {cpu_ms[(label, kind, conc)]:.1f} | {r['errors']} |")
                    print(rows[-1], flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    proc, base = start_server(runs, 16, queue=args.queue)
    try:
        over = asyncio.run(load(base, "generate", 10 * args.queue, 10 * args.queue, args.steps, args.time_cap))
        alive = httpx.get(base + "/healthz", timeout=5).status_code
    finally:
        proc.terminate()
        proc.wait(30)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"\ncommit {commit}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.requests} requests a phase, {args.steps} sampling steps, demo-sized cascade (16px + 32px)\n")
    print("| endpoint | batching | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | rows/batch | server CPU ms/req | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for kind in ("generate", "predict"):
        print(f"\n{kind}: batching gain at concurrency 16 = {rps[('batching', kind, 16)] / max(rps[('off', kind, 16)], 1e-9):.2f}x "
              f"requests/s; server CPU per request {cpu_ms[('off', kind, 16)] / max(cpu_ms[('batching', kind, 16)], 1e-9):.2f}x less")
    print(f"overload ({10 * args.queue} at once, queue {args.queue}): status codes {over['codes']}, "
          f"{over['ok']} answered; /healthz afterwards: {alive}")
    return 0 if set(over["codes"]) <= {200, 429} and alive == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
