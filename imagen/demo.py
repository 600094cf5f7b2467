"""`imagen demo`: the whole pipeline on the built-in Shapes world, sized for a laptop CPU.

Shapes captions -> self-supervised pretraining -> colour-shape classification fine-tuning (from the
pretrained encoder and, for comparison, from scratch) -> an evaluation report with a before/after table.
"""

from __future__ import annotations

import time
from pathlib import Path

import imagen.api as api

# Step budgets: the full demo finishes in a few minutes on 2 CPU cores; --fast is a smoke test.
FULL = dict(pretrain_steps=400, finetune_steps=250, n=4000)
FAST = dict(pretrain_steps=8, finetune_steps=8, n=200)


def run_demo(out: str | Path | None = None, fast: bool = False, progress: bool = True, echo=print) -> int:
    """Run the demo into `out` (default runs/demo-<time>) and print where everything is."""
    budget = FAST if fast else FULL
    out = Path(out) if out is not None else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    pre, fine, scratch = out / "pretrain", out / "classify", out / "classify-scratch"
    common = dict(n=budget["n"], progress=progress, batch_size=64, report_to=("jsonl", "tensorboard"))
    start = time.time()

    echo(f"[1/4] pretraining the multimodal encoder on Shapes captions (MLM + MIM + ITC + ITM) -> {pre}")
    api.pretrain("shapes", pre, preset="tiny", max_steps=budget["pretrain_steps"], lr=2e-3, **common)
    echo(f"[2/4] fine-tuning colour-shape classification from the pretrained encoder -> {fine}")
    api.finetune("classify", "shapes", fine, init_from=pre, label="color-shape", max_steps=budget["finetune_steps"], lr=1e-3, **common)
    echo(f"[3/4] the same fine-tuning from scratch, for comparison -> {scratch}")
    api.finetune("classify", "shapes", scratch, preset="tiny", label="color-shape", max_steps=budget["finetune_steps"], lr=1e-3, **common)
    echo("[4/4] evaluating on the Shapes test split")
    result = api.evaluate(fine, "shapes", split="test", compare=[scratch], echo=echo)

    minutes = (time.time() - start) / 60
    echo(f"\ndemo finished in {minutes:.1f} min. Test accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}.")
    echo(f"outputs under {out}/:")
    echo(f"  {pre}/            pretraining run (config.json, model.safetensors, tokenizer.json, metrics.jsonl, tensorboard/)")
    echo(f"  {fine}/            fine-tuned classifier; eval/ holds the report JSON and confusion matrix PNG")
    echo(f"  {scratch}/    the from-scratch baseline")
    echo(f"next: imagen predict --run {fine} IMAGE.png   |   tensorboard --logdir {out}")
    return 0
