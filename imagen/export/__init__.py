"""`imagen export`: a finished run as ONNX graphs (checked against onnxruntime) or a Hugging Face style folder.

    imagen export runs/cls --format onnx --out exported/cls-onnx
    imagen export runs/cls --format hf --out exported/cls        # ImagenModel.from_pretrained / imagen.load read it

The target folder is filled beside its final place and renamed into it at the end, so an export that fails or is
stopped leaves nothing behind that looks complete. Each export writes `export.json`: what it holds and how to feed
it (inputs, shapes, preprocessing), and for ONNX each graph's measured difference from PyTorch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from imagen.atomic import atomic_dir, write_json
from imagen.errors import ConfigError
from imagen.export.hub import ImagenModel, is_t2i_run
from imagen.export.onnx import TOLERANCE, graph_for_stage, graphs_for_encoder_run, write_graphs
from imagen.runs import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, check_new_run_dir
from imagen.tasks.loading import load
from imagen.tasks.text_to_image import load_stage, read_finished_t2i_config, text_encoder_for

FORMATS = ("onnx", "hf")
MANIFEST_NAME = "export.json"
# What the ONNX image inputs expect, as the toolkit's own preprocessing does it (imagen.data.images).
IMAGE_PREPROCESSING = ("RGB, resized on the shorter side (bicubic) and centre-cropped to image_size, "
                       "float32 (B, 3, H, W), pixel / 127.5 - 1 (range [-1, 1])")

__all__ = ["export_run", "ImagenModel", "FORMATS", "MANIFEST_NAME", "TOLERANCE"]


def check_target(out: Path) -> None:
    """Refuse an --out that would overwrite something or cannot be written, before any work is done."""
    check_new_run_dir(out, error=ConfigError, when_taken="choose a new folder")


def _onnx_t2i(run: Path, config: dict[str, Any], tmp: Path, echo) -> dict[str, Any]:
    encoder = text_encoder_for(run, config["text_encoder"])
    graphs = [graph_for_stage(load_stage(run, name, text_encoder=encoder), min(encoder.max_length, 16))
              for name in config["stages"]]
    manifest = {"graphs": write_graphs(graphs, tmp, echo=echo), "stages": config["stages"],
                "text_encoder": config["text_encoder"],
                "note": "each graph is one U-Net step of its stage (EMA weights); prompts are encoded by the run's text "
                        "encoder (text_states: its per-token states, zero at padding; text_embed: its pooled vector; "
                        "an all-zero text_mask and text_embed is the unconditional input of classifier-free guidance; a "
                        "guidance-distilled stage's graph also takes `guidance`, the scale, and predicts the guided "
                        "output in one call)"}
    if (run / TOKENIZER_NAME).is_file():
        shutil.copy2(run / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
    return manifest


def _onnx_encoder(run: Path, tmp: Path, echo) -> dict[str, Any]:
    loaded = load(run)
    graphs = graphs_for_encoder_run(loaded)  # a task without ONNX graphs fails here, before any export
    manifest = {"graphs": write_graphs(graphs, tmp, echo=echo), "image_size": loaded.config.model.image_size,
                "preprocessing": IMAGE_PREPROCESSING, "class_names": loaded.class_names}
    if loaded.tokenizer is not None:
        shutil.copy2(run / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
        manifest["tokenizer"] = (f"{TOKENIZER_NAME} (Hugging Face tokenizers); input_ids: [CLS] tokens [SEP], "
                                 f"padded with 0 to at most {loaded.config.model.max_text_len} tokens, attention_mask 1 on tokens")
    return manifest


def export_run(run: str | Path, format: str, out: str | Path, echo=print) -> Path:
    """Export a finished run to `out` (which must be absent or empty) as ONNX graphs or a Hugging Face folder."""
    run, out = Path(run), Path(out)
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    check_target(out)
    t2i = is_t2i_run(run)
    if t2i:
        config = read_finished_t2i_config(run)
    elif not (run / WEIGHTS_NAME).is_file():
        load(run)  # the one-line reason: no such folder, not a run, or not finished
    manifest: dict[str, Any] = {"format": format, "source": str(run), "task": "text-to-image" if t2i else
                                json.loads((run / CONFIG_NAME).read_text()).get("task")}
    with atomic_dir(out) as tmp:
        if format == "onnx":
            manifest.update(_onnx_t2i(run, config, tmp, echo) if t2i else _onnx_encoder(run, tmp, echo))
        else:
            model = ImagenModel.from_folder(run)
            model.save_pretrained(tmp, model_card_kwargs={"folder": out.name})
            manifest["load"] = ("ImagenModel.from_pretrained(folder) (imagen.export), or imagen.load(folder)" if not t2i
                                else "ImagenModel.from_pretrained(folder), or TextToImagePipeline.from_run(folder)")
        write_json(tmp / MANIFEST_NAME, manifest)
    echo(f"exported {run} ({manifest['task']}) as {format} to {out}")
    return out
