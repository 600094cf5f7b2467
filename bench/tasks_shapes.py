"""Understanding tasks on the Shapes world: each task's default recipe from three starts, with its metrics.

    python bench/tasks_shapes.py [--tasks vqa,caption,detect,retrieval,instruct] [--starts scratch,frozen,finetuned]
                                 [--pretrain-epochs 5] [--out runs/bench-tasks]

Starts (the same labels each time): `scratch` (no pretraining), `frozen` (pretrained encoder frozen, head only:
the linear-probe analogue) and `finetuned` (pretrained, everything trained). One pretraining run on Shapes
captions (MLM + MIM + ITC + ITM) serves every task. Each fine-tune prints its wall time: the targets ask for
<= 15 minutes on 2 CPU cores per default recipe (the pretraining run's time is printed separately).

Targets: VQA accuracy >= 0.95; caption fact_accuracy >= 0.90; detection map_50 >= 0.90; retrieval r@1 >= 0.80.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import imagen
from imagen.tasks import get_task

TASKS = ("vqa", "caption", "detect", "retrieval", "instruct")
STARTS = ("scratch", "frozen", "finetuned")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--starts", default=",".join(STARTS))
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--pretrain", default=None, help="an existing pretraining run to reuse")
    p.add_argument("--out", default="runs/bench-tasks")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(progress=False, device=args.device, report_to=("jsonl",))
    starts = args.starts.split(",")
    pre = Path(args.pretrain) if args.pretrain else out / "pretrain"
    if any(s != "scratch" for s in starts) and not (pre / "model.safetensors").exists():
        shutil.rmtree(pre, ignore_errors=True)
        t = time.time()
        imagen.pretrain("shapes", pre, epochs=args.pretrain_epochs, **common)
        print(f"pretraining: {args.pretrain_epochs} epochs in {(time.time() - t) / 60:.1f} min", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = []
    for task in args.tasks.split(","):
        headline = get_task(task).headline
        for start in starts:
            run = out / f"{task}-{start}"
            shutil.rmtree(run, ignore_errors=True)
            kw = {} if start == "scratch" else dict(init_from=pre, freeze="encoder" if start == "frozen" else "none")
            t = time.time()
            imagen.finetune(task, "shapes", run, **kw, **common)
            minutes = (time.time() - t) / 60
            report = imagen.evaluate(run, "shapes", split="test", echo=lambda *a, **k: None)
            row = {"task": task, "start": start, "minutes": round(minutes, 1), "commit": commit,
                   **{k: v for k, v in report.items() if isinstance(v, float)}}
            results.append(row)
            print(f"| {task} | {start} | " + " | ".join(f"{k} {row.get(k, float('nan')):.3f}" for k in headline)
                  + f" | {minutes:.1f} min | {commit} |", flush=True)
    (out / f"results-{args.tasks.replace(',', '+')}-{args.starts.replace(',', '+')}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
