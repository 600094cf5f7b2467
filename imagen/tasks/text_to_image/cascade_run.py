"""The text-to-image run directory: its layout, its config, and loading one trained stage back.

    RUN/config.json        {"task": "text-to-image", "stages": [...], "text_encoder": spec, "data": ...,
                            "sizes": [...], "stage_configs": {name: StageConfig}}
    RUN/tokenizer.json     when the text encoder is trained with the U-Nets
    RUN/base/, RUN/sr1/    one trainer run directory per stage (config.json, model.safetensors, checkpoints/,
                           metrics.jsonl, samples/ grids written as training goes)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imagen.data import Tokenizer
from imagen.errors import RunError
from imagen.models.text_encoders import TextEncoder, build_text_encoder
from imagen.models.text_to_image import StageConfig, TextToImageStage
from imagen.runs import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME
from imagen.train.checkpoint import load_weights

TASK = "text-to-image"
STAGE_TASK = "text-to-image-stage"  # the "task" of each stage's own config.json


def read_t2i_config(run: str | Path) -> dict[str, Any]:
    """The parsed config.json of a text-to-image run, with one-line errors for anything else."""
    run = Path(run)
    path = run / CONFIG_NAME
    if not path.is_file():
        raise RunError(f"{run} is not a run directory (no {CONFIG_NAME}); pass the --out folder of `imagen train-t2i`")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is damaged ({e.msg}); train the run again") from None
    if config.get("task") != TASK:
        raise RunError(f"{run} is a {config.get('task', 'unknown')!r} run, not a text-to-image run; train one with `imagen train-t2i`")
    return config


def read_finished_t2i_config(run: str | Path) -> dict[str, Any]:
    """`read_t2i_config` of a run every stage of which has its final weights, or a one-line RunError."""
    run = Path(run)
    config = read_t2i_config(run)
    missing = [s for s in config["stages"] if not (run / s / WEIGHTS_NAME).is_file()]
    if missing:
        raise RunError(f"{run} is not a finished run (stage {missing[0]} has no {WEIGHTS_NAME}); finish it with "
                       f"`imagen train-t2i --out {run} --resume`")
    return config


def text_encoder_for(run: Path, spec: dict[str, Any]) -> TextEncoder:
    """The run's text encoder rebuilt from its spec (a trainable one with the run's tokenizer.json)."""
    tokenizer = Tokenizer.load(run / TOKENIZER_NAME) if (run / TOKENIZER_NAME).is_file() else None
    return build_text_encoder(spec, tokenizer=tokenizer)


def load_stage(run: Path, name: str, text_encoder: TextEncoder | None = None, map_location="cpu") -> TextToImageStage:
    """One finished stage of a cascade run, in eval mode; `text_encoder` shares an already loaded frozen encoder."""
    stage_dir = run / name
    if not (stage_dir / WEIGHTS_NAME).is_file():
        raise RunError(f"stage {name!r} of {run} is not trained (no {name}/{WEIGHTS_NAME}); train it with "
                       f"`imagen train-t2i --out {run} --stage {name}` (or --resume)")
    stage_cfg = StageConfig(**json.loads((stage_dir / CONFIG_NAME).read_text())["stage"])
    if text_encoder is None:
        text_encoder = text_encoder_for(run, read_t2i_config(run)["text_encoder"])
    stage = TextToImageStage(stage_cfg, text_encoder)
    load_weights(stage_dir / WEIGHTS_NAME, stage)
    return stage.to(map_location).eval()
