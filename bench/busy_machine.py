"""Training speed on a busy machine: the base U-Net step of the text-to-image recipe alone and beside a competing
process, for intra-op thread counts and OpenMP wait policies.

    python bench/busy_machine.py [--seconds 12] [--batch-size 32]

Each condition runs in a fresh process (thread settings must precede torch's start-up). The competitor is one
process spinning on one core, as a browser tab or a second job would. Two intra-op threads on two cores wait for
each other at every parallel region; when one is descheduled, every operator waits a scheduler time slice.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The step of bench/unet_throughput.py (fp32), timed for `seconds` after three warm-up steps.
WORKER = r"""
import json, sys, time
import torch
threads, seconds, batch, bench_dir = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
sys.path.insert(0, bench_dir)
from unet_throughput import training_step
step, _ = training_step("base16", batch)
for _ in range(3):
    step()
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    step(); n += 1
print(json.dumps({"steps_per_s": n / (time.perf_counter() - start)}))
"""


def run(threads: int, policy: str | None, busy: bool, seconds: float, batch: int) -> float:
    env = {**os.environ}
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        done = subprocess.run([sys.executable, "-c", WORKER, str(threads), str(seconds), str(batch),
                               str(Path(__file__).resolve().parent)], env=env,
                              capture_output=True, text=True, check=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])["steps_per_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    print(f"{'threads':>7s} {'OMP_WAIT_POLICY':>15s} {'alone':>9s} {'busy':>9s} {'busy/alone':>10s}  (steps/s)")
    for threads, policy in itertools.product((2, 1), (None, "PASSIVE")):
        alone = run(threads, policy, False, args.seconds, args.batch_size)
        busy = run(threads, policy, True, args.seconds, args.batch_size)
        print(f"{threads:7d} {policy or 'default':>15s} {alone:9.2f} {busy:9.2f} {busy / alone:10.2f}", flush=True)
        time.sleep(1)


if __name__ == "__main__":
    main()
