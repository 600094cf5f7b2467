"""The runs a server answers with, loaded once at start-up, and what each one does with a batch of requests."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

import imagen.api as api
from imagen.data.image_files import to_uint8
from imagen.registry import Registry
from imagen.errors import USER_ERRORS, RunError
from imagen.tasks.registry import get_task
from imagen.train import resolve_device

T2I_TASK = "text-to-image"
log = logging.getLogger("imagen")


@dataclass
class ServedModel:
    """One loaded run: a text-to-image pipeline, or a fine-tuned understanding model (`api.load`)."""

    name: str
    path: Path
    task: str
    pipeline: api.TextToImagePipeline | None = None
    loaded: api.LoadedRun | None = None
    registry: Path | None = None  # served from a registry: the version is whatever its `current` link names
    version: str | None = None

    @property
    def generates(self) -> bool:
        return self.pipeline is not None

    def describe(self) -> dict[str, Any]:
        """What /v1/models shows: the name to use in requests, the task and its options."""
        if self.pipeline is not None:
            options = {"image_size": self.pipeline.image_size, "stages": self.pipeline.stage_names,
                       "max_steps": min(s.config.timesteps for s in self.pipeline.stages)}
            return {"name": self.name, "task": self.task, "kind": "generate", "options": options, **self._version()}
        inputs = [k for k in (get_task(self.task).predict_inputs or ()) if k in PREDICT_INPUTS]
        return {"name": self.name, "task": self.task, "kind": "predict",
                "options": {"inputs": inputs, "image_size": self.loaded.config.model.image_size,
                            "classes": self.loaded.config.class_names}, **self._version()}

    def _version(self) -> dict[str, Any]:
        return {"registry": str(self.registry), "version": self.version} if self.registry is not None else {}


# The predict inputs a request may carry (detect's out_dir names a server path, so it is never accepted).
PREDICT_INPUTS = ("question", "instruction", "texts")


def _task_of(run: Path) -> str:
    path = run / "config.json"
    if not path.is_file():
        raise RunError(f"{run} is not a run directory (no config.json); pass the --out folder of a finished run")
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("task"))
    except (ValueError, AttributeError):
        raise RunError(f"{path} is damaged; train the run again") from None


def load_model(run: str | Path, name: str, device: str = "auto") -> ServedModel:
    """A finished run loaded for serving; RunError (one line) for anything that is not one."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"run directory {run} does not exist")
    task = _task_of(run)
    if task == T2I_TASK:
        pipe = api.TextToImagePipeline.from_run(run, device=device)
        missing = [s for s in pipe.config["stages"] if s not in pipe.stage_names]
        if missing:
            raise RunError(f"{run} is not a finished run (stage {missing[0]} is not trained); "
                           f"finish it with `imagen train-t2i --out {run} --resume`")
        return ServedModel(name, run, task, pipeline=pipe)
    loaded = api.load(run, map_location=resolve_device(device))
    if get_task(loaded.task).predict_inputs is None:
        raise RunError(f"{run} is a {loaded.task} run; serve a fine-tuned run (imagen finetune --task ...) or a text-to-image run")
    return ServedModel(name, run, loaded.task, loaded=loaded)


def load_registry_model(registry: str | Path, name: str, device: str = "auto") -> ServedModel:
    """The current version of a model registry, served under `name`."""
    reg = Registry.open(registry)
    version = reg.current()
    model = load_model(reg.versions_dir / version, name, device)
    return dataclasses.replace(model, registry=reg.path, version=version)


# (registry, version) pairs that failed to load: tried once, not on every batch, until `current` moves on.
_FAILED_VERSIONS: set[tuple[str, str]] = set()


def follow_current(model: ServedModel, device: str = "auto") -> ServedModel:
    """`model`, or the registry's new current version when a refresh has promoted one since it was loaded."""
    if model.registry is None:
        return model
    try:
        current = Registry(model.registry).current()
    except (*USER_ERRORS, OSError):
        return model  # the registry is unreadable right now: keep answering with the loaded version
    if current == model.version or (str(model.registry), current) in _FAILED_VERSIONS:
        return model
    try:
        new = load_registry_model(model.registry, model.name, device)
    except (*USER_ERRORS, OSError) as e:  # a version that does not load: keep answering with the one that does
        _FAILED_VERSIONS.add((str(model.registry), current))
        log.warning("%s: cannot load the new current version %s of %s (%s); still serving version %s",
                    model.name, current, model.registry, e, model.version)
        return model
    log.info("%s: now serving version %s of %s (was %s)", model.name, new.version, model.registry, model.version)
    return new


def load_models(runs: Sequence[str | Path], device: str = "auto", registries: Sequence[str | Path] = ()) -> dict[str, ServedModel]:
    """Each run under its folder's name (parent/name when two folders share a name), each registry under its own
    name, serving its current version."""
    runs, registries = list(runs or ()), list(registries or ())
    if not runs and not registries:
        raise RunError("no run to serve; pass --run RUN (a finished run directory) or --registry models/NAME")
    paths = [Path(r) for r in runs + registries]
    names = [p.resolve().name for p in paths]
    names = [n if names.count(n) == 1 else f"{p.resolve().parent.name}/{n}" for n, p in zip(names, paths)]
    if len(set(names)) != len(names):
        raise RunError(f"two runs share the name {next(n for n in names if names.count(n) > 1)!r}; pass each run once")
    models = {name: load_model(p, name, device) for name, p in zip(names[:len(runs)], paths[:len(runs)])}
    models.update({name: load_registry_model(p, name, device) for name, p in zip(names[len(runs):], paths[len(runs):])})
    return models


def png_base64(image) -> str:
    """One (3, H, W) uint8 tensor as a base64 PNG (what /v1/generate answers)."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def run_generate(model: ServedModel, config: api.SamplingConfig, requests: Sequence[tuple[str, int, int]],
                 progress=None) -> list[list[str]]:
    """A batch of (prompt, seed, n) requests that share `config`: each one's base64 PNGs, sample k of a request
    being the picture `imagen generate --seed SEED` makes as its sample k. `progress(stage, step, steps)` sees
    every sampling step of the batch."""
    rows = [(prompt, seed, k) for prompt, seed, n in requests for k in range(n)]
    config = dataclasses.replace(config, batch_size=max(len(rows), 1))
    images = to_uint8(model.pipeline.generate_rows(rows, config, progress=progress))
    out, start = [], 0
    for _, _, n in requests:
        out.append([png_base64(img) for img in images[start:start + n]])
        start += n
    return out


def run_predict(model: ServedModel, inputs: dict[str, Any], requests: Sequence[tuple[Image.Image, str]]) -> list[dict]:
    """A batch of (image, file name) requests with the same inputs: each one's answer as `imagen predict --json`."""
    top_k = inputs.get("top_k", 1)
    given = {k: list(v) if isinstance(v, tuple) else v for k, v in inputs.items() if k != "top_k"}
    return api.predict_images(model.loaded, [img for img, _ in requests], [name for _, name in requests], top_k=top_k, **given)
