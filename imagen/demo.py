"""`imagen demo`: the whole pipeline on the built-in Shapes world, sized for a laptop CPU.

Shapes captions -> self-supervised pretraining -> colour-shape classification fine-tuning (from the
pretrained encoder and, for comparison, from scratch) -> an evaluation report with a before/after table ->
a short text-to-image cascade (16x16 base + 32x32 super-resolution) and a grid of generated samples -> one HTML
report of all of it (RUN/report.html, `imagen report`).
"""

from __future__ import annotations

import time
from pathlib import Path

import imagen.api as api

# Step budgets: the full demo finishes in a few minutes on 2 CPU cores; --fast is a smoke test.
FULL = dict(pretrain_steps=400, finetune_steps=400, n=4000, t2i_steps=500, sr_steps=250, sizes=(16, 32), t2i_sets=())
FAST = dict(pretrain_steps=8, finetune_steps=8, n=200, t2i_steps=3, sr_steps=3, sizes=(8, 16),
            t2i_sets=("base.unet.dim=16", "base.unet.num_heads=2", "sr1.unet.dim=16", "sr1.unet.num_heads=2"))
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def run_demo(out: str | Path | None = None, fast: bool = False, progress: bool = True, echo=print) -> int:
    """Run the demo into `out` (default runs/demo-<time>) and print where everything is."""
    budget = FAST if fast else FULL
    out = Path(out) if out is not None else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    pre, fine, scratch, t2i = out / "pretrain", out / "classify", out / "classify-scratch", out / "text-to-image"
    common = dict(n=budget["n"], progress=progress, batch_size=64, report_to=("jsonl", "tensorboard"))
    start = time.time()

    echo(f"[1/5] pretraining the multimodal encoder on Shapes captions (MLM + MIM + ITC + ITM) -> {pre}")
    api.pretrain("shapes", pre, preset="tiny", max_steps=budget["pretrain_steps"], lr=2e-3, **common)
    echo(f"[2/5] fine-tuning colour-shape classification from the pretrained encoder -> {fine}")
    api.finetune("classify", "shapes", fine, init_from=pre, label="color-shape", max_steps=budget["finetune_steps"], **common)
    echo(f"[3/5] the same fine-tuning from scratch, for comparison -> {scratch}")
    api.finetune("classify", "shapes", scratch, preset="tiny", label="color-shape", max_steps=budget["finetune_steps"], **common)
    echo("[4/5] evaluating on the Shapes test split")
    result = api.evaluate(fine, "shapes", split="test", compare=[scratch], echo=echo)
    echo(f"[5/5] a short text-to-image cascade ({budget['sizes'][0]}px base + {budget['sizes'][1]}px super-resolution) -> {t2i}")
    api.train_t2i("shapes", t2i, sizes=budget["sizes"], n=budget["n"], max_steps=budget["t2i_steps"], sr_max_steps=budget["sr_steps"],
              batch_size=32, progress=progress, sets=budget["t2i_sets"])
    grid = api.generate_to_files(t2i, PROMPTS, api.SamplingConfig(n=4, steps=20), out=t2i / "demo-samples.png")[0]

    report = api.write_report(fine, [scratch, pre, t2i], out / "report.html")
    minutes = (time.time() - start) / 60
    echo(f"\ndemo finished in {minutes:.1f} min. Test accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}.")
    echo(f"outputs under {out}/:")
    echo(f"  {pre}/            pretraining run (config.json, model.safetensors, tokenizer.json, metrics.jsonl, tensorboard/)")
    echo(f"  {fine}/            fine-tuned classifier; eval/ holds the report JSON and confusion matrix PNG")
    echo(f"  {scratch}/    the from-scratch baseline")
    echo(f"  {t2i}/       text-to-image cascade; {grid.name}: one row per prompt ({', '.join(PROMPTS)})")
    echo("  (a short run: the full recipe is `imagen train-t2i --data shapes --out RUN`, about 27 CPU-minutes)")
    echo(f"next: imagen predict --run {fine} IMAGE.png   |   imagen generate --run {t2i} \"a red circle\" --out grid.png")
    echo(f"      tensorboard --logdir {out}")
    echo(f"report (open it in a browser): {report}")
    return 0
