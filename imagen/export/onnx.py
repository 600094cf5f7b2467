"""ONNX graphs of finished runs, each checked against onnxruntime before the export counts as done.

What a graph computes is what the toolkit itself runs at inference, with a dynamic batch dimension:
- classify: normalised images (B, 3, S, S) in [-1, 1] -> class logits (B, num_classes);
- retrieval: images -> unit image embeddings (B, proj_dim), and token ids + mask -> unit text embeddings;
- text-to-image: one U-Net step per cascade stage (its EMA weights, as sampling uses them):
  (x_t, t, text_states, text_mask, text_embed [, lowres_image, lowres_noise_level]) -> the stage's prediction
  (v, eps or x0, as the stage was trained), so any sampler can drive it.

Graphs come from PyTorch's default exporter (`torch.onnx.export(..., dynamo=True)`, torch.export + onnxscript):
it runs offline and, unlike the TorchScript one PyTorch deprecates, keeps dimensions symbolic instead of tracing
one batch size. Each graph is then run by onnxruntime on random inputs of another batch size than the one it was
exported with, and the largest absolute difference from PyTorch is recorded (and must be at most `TOLERANCE`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from imagen.errors import ConfigError, RunError

log = logging.getLogger("imagen")

OPSET = 18
TOLERANCE = 1e-4  # largest |onnxruntime - PyTorch| accepted on random inputs
EXPORT_BATCH, CHECK_BATCH = 2, 3  # a graph is checked at another batch size than it was exported with


# --- the graphs: thin modules whose forward is exactly one exported function --------------------------------


class ClassifierGraph(nn.Module):
    """images (B, 3, S, S) in [-1, 1] -> logits (B, num_classes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images=images).logits


class ImageEmbeddingGraph(nn.Module):
    """images (B, 3, S, S) in [-1, 1] -> unit image embeddings (B, proj_dim)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.embed_images(images)


class TextEmbeddingGraph(nn.Module):
    """token ids (B, T) and attention mask (B, T, 1 = token) -> unit text embeddings (B, proj_dim)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.embed_texts(input_ids, attention_mask.bool())


class UNetStepGraph(nn.Module):
    """One denoising step of a cascade stage's EMA U-Net; SR stages also take the (upsampled, noise-augmented)
    low-resolution image and its noise level, guidance-distilled stages the guidance scale."""

    def __init__(self, unet: nn.Module, sr: bool, guidance: bool = False):
        super().__init__()
        self.unet = unet
        self.sr = sr
        self.guidance = guidance

    def forward(self, x_t, t, text_states, text_mask, text_embed, lowres_image=None, lowres_noise_level=None, guidance=None):
        extra = {"lowres_image": lowres_image, "lowres_noise_level": lowres_noise_level} if self.sr else {}
        if self.guidance:
            extra["guidance"] = guidance
        return self.unet(x_t, t, text_states=text_states, text_mask=text_mask.bool(), text_embed=text_embed, **extra).float()


@dataclass
class Graph:
    """One graph to export: its module, example inputs for batch size b, and which dims are dynamic."""

    name: str  # file stem: NAME.onnx
    module: nn.Module
    make_inputs: Callable[[int, torch.Generator], dict[str, torch.Tensor]]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]  # input name -> {dim: symbolic name}
    max_dims: dict[str, int] = field(default_factory=dict)  # symbolic name -> largest size (text length)
    info: dict[str, Any] = field(default_factory=dict)


def _images(b: int, size: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def _token_inputs(b: int, length: int, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, vocab, (b, length), generator=g)
    lengths = torch.randint(2, length + 1, (b,), generator=g)
    lengths[0] = length  # one full row, the others padded: both kinds of rows are checked
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def graphs_for_encoder_run(loaded) -> list[Graph]:
    """The graphs of a classify or retrieval run (a LoadedRun)."""
    m = loaded.config.model
    size = m.image_size
    batch = {0: "batch"}
    if loaded.task == "classify":
        return [Graph("model", ClassifierGraph(loaded.model), lambda b, g: {"images": _images(b, size, g)}, ["logits"],
                      {"images": batch}, info={"class_names": loaded.class_names})]
    if loaded.task == "retrieval":
        length = m.max_text_len
        text_dims = {0: "batch", 1: "text_len"}
        return [
            Graph("image_encoder", ImageEmbeddingGraph(loaded.model), lambda b, g: {"images": _images(b, size, g)},
                  ["image_embeds"], {"images": batch}),
            Graph("text_encoder", TextEmbeddingGraph(loaded.model), lambda b, g: _token_inputs(b, length, m.vocab_size, g),
                  ["text_embeds"], {"input_ids": text_dims, "attention_mask": text_dims}, max_dims={"text_len": length}),
        ]
    raise ConfigError(f"ONNX export covers classify, retrieval and text-to-image runs; {loaded.path} is a {loaded.task} "
                      "run: export it with --format hf")


def graph_for_stage(stage, text_len: int) -> Graph:
    """The U-Net step graph of one loaded cascade stage; `text_len` sizes the example text states."""
    c = stage.config
    u = c.unet
    size, dim = u.image_size, u.text_dim
    cond_dim = u.cond_dim

    def make_inputs(b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        length = text_len
        lengths = torch.randint(1, length + 1, (b,), generator=g)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        mask[-1] = 0  # the null condition of classifier-free guidance: no visible token
        inputs = {
            "x_t": torch.randn(b, u.in_channels, size, size, generator=g),
            "t": torch.randint(0, c.timesteps, (b,), generator=g),
            "text_states": torch.randn(b, length, dim, generator=g) * mask[..., None],
            "text_mask": mask,
            "text_embed": torch.randn(b, cond_dim, generator=g),
        }
        if c.is_sr:
            inputs["lowres_image"] = torch.randn(b, u.in_channels, size, size, generator=g)
            inputs["lowres_noise_level"] = torch.rand(b, generator=g)
        if c.guidance_distilled:
            low, high = c.guidance_range
            inputs["guidance"] = low + (high - low) * torch.rand(b, generator=g)
        return inputs

    dynamic = {"x_t": {0: "batch"}, "t": {0: "batch"}, "text_states": {0: "batch", 1: "text_len"},
               "text_mask": {0: "batch", 1: "text_len"}, "text_embed": {0: "batch"}}
    if c.is_sr:
        dynamic.update(lowres_image={0: "batch"}, lowres_noise_level={0: "batch"})
    info = {"stage": c.name, "image_size": size, "objective": c.objective, "schedule": c.schedule,
            "timesteps": c.timesteps, "lowres_size": c.lowres_size}
    if c.guidance_distilled:  # one call per step: the guided prediction at input `guidance`, no unconditional branch
        dynamic["guidance"] = {0: "batch"}
        info.update(guidance_distilled=True, guidance_range=list(c.guidance_range))
    if c.distilled_steps is not None:  # a progressively distilled step: only its own DDIM grid makes good pictures
        info.update(distilled_steps=c.distilled_steps, distilled_sampler=c.distilled_sampler)
    return Graph(f"unet_{c.name}", UNetStepGraph(stage.ema_unet, c.is_sr, c.guidance_distilled), make_inputs, ["prediction"],
                 dynamic, info=info)


# --- export and check ----------------------------------------------------------------------------------------


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("ONNX export needs onnx, onnxscript and onnxruntime (the export extra): "
                          "pip install -e \".[export]\"") from None
    return onnxruntime


def export_graph(graph: Graph, path: Path) -> None:
    """Write one graph to `path` with its dynamic dimensions."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; a missing one should say so in one line)
    except ImportError:
        raise ConfigError("ONNX export needs onnx, onnxscript and onnxruntime (the export extra): "
                          "pip install -e \".[export]\"") from None
    inputs = graph.make_inputs(EXPORT_BATCH, torch.Generator().manual_seed(0))
    dims = {}  # one torch.export.Dim per symbolic name, shared by the inputs that carry it
    for axes in graph.dynamic.values():
        for sym in axes.values():
            if sym not in dims:
                dims[sym] = torch.export.Dim(sym, max=graph.max_dims[sym]) if sym in graph.max_dims else torch.export.Dim(sym)
    shapes = {name: {axis: dims[sym] for axis, sym in graph.dynamic.get(name, {}).items()} or None for name in inputs}
    graph.module.eval()
    # The exporter prints its progress and warns about optional operator sets (torchvision); neither concerns a user.
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph.module, (), kwargs=inputs, dynamic_shapes=shapes, input_names=list(inputs),
                                        output_names=graph.outputs, opset_version=OPSET, dynamo=True, verbose=False)
        program.save(str(path))
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def check_graph(graph: Graph, path: Path) -> float:
    """Largest |onnxruntime - PyTorch| over the outputs for random inputs of batch CHECK_BATCH."""
    ort = _onnxruntime()
    gen = torch.Generator().manual_seed(1)
    inputs = graph.make_inputs(CHECK_BATCH, gen)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = graph.module(**inputs)
    want = want if isinstance(want, (tuple, list)) else [want]
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))


def describe(graph: Graph) -> dict[str, Any]:
    """Input and output names, shapes (symbolic dims by name) and dtypes, as the manifest records them."""
    example = graph.make_inputs(EXPORT_BATCH, torch.Generator().manual_seed(0))
    inputs = {}
    for name, t in example.items():
        axes = graph.dynamic.get(name, {})
        inputs[name] = {"shape": [axes.get(i, int(s)) for i, s in enumerate(t.shape)], "dtype": str(t.dtype).replace("torch.", "")}
    return {"inputs": inputs, "outputs": graph.outputs, **graph.info}


def write_graphs(graphs: list[Graph], folder: Path, echo=print) -> dict[str, Any]:
    """Export every graph into `folder`, check each with onnxruntime; the manifest entries {file stem: ...}."""
    _onnxruntime()  # a missing runtime fails before minutes of exporting
    entries = {}
    for graph in graphs:
        path = folder / f"{graph.name}.onnx"
        export_graph(graph, path)
        diff = check_graph(graph, path)
        if not diff <= TOLERANCE:
            raise RunError(f"the exported {path.name} differs from PyTorch by {diff:.3g} (more than {TOLERANCE:g}) on "
                           "random inputs; this model cannot be exported faithfully")
        echo(f"{path.name}: onnxruntime matches PyTorch (max abs diff {diff:.2e})")
        entries[graph.name] = {"file": path.name, **describe(graph), "max_abs_diff": diff}
    return entries
