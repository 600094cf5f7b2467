"""The Python API behind the CLI: pretrain, finetune, evaluate and predict, each one function and one path for
every task (the task's class in imagen/tasks/ supplies everything that differs); and the text-to-image cascade's
train_t2i, generate_to_files and evaluate_t2i (imagen/tasks/text_to_image/, imagen/pipelines/); and the model's
lifecycle: write_report (imagen/reports/), init_registry and refresh (imagen/registry/), export_run (imagen/export/).

    import imagen
    imagen.pretrain(data="shapes", out="runs/pre", max_steps=200)
    imagen.finetune(task="classify", data="shapes", out="runs/cls", init_from="runs/pre", label="color-shape")
    report = imagen.evaluate("runs/cls", data="shapes", split="test")
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from imagen.atomic import write_json
from imagen.config import EncoderConfig, TrainConfig, apply_overrides, encoder_config, to_dict
from imagen.data import Tokenizer, image_to_tensor, load_dataset, open_image, write_shapes
from imagen.data.registry import builtin_key, recorded_spec
from imagen.errors import ConfigError, DataError, RunError
from imagen.pipelines import SamplingConfig, TextToImagePipeline, evaluate_t2i, generate_to_files, read_prompts
from imagen.runs import (CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, RunConfig, check_resume_changes, check_run_dir,
                         load_tokenizer, open_run, read_config, run_in_use)
from imagen.tasks.base import EvalData, RunScore
from imagen.tasks.loading import LoadedRun, load
from imagen.tasks.registry import get_task
from imagen.tasks.text_to_image import distill_t2i, progressive_distill_t2i, train_t2i
from imagen.train import (Trainer, TrainResult, broadcast_object, destroy_processes, from_main, init_distributed,
                          latest_checkpoint, launch_local, resolve_device, seed_everything)

log = logging.getLogger("imagen")

__all__ = ["finish_processes", "launch_processes", "run_in_use", "task_metrics", "task_option_names", "task_search_space", "pretrain",
           "finetune", "train_task", "evaluate", "predict", "predict_images", "load", "LoadedRun", "train_t2i", "distill_t2i", "progressive_distill_t2i", "generate_to_files",
           "evaluate_t2i", "read_prompts", "SamplingConfig", "TextToImagePipeline", "write_shapes", "export_run", "ImagenModel",
           "write_report", "Registry", "init_registry", "refresh"]

# The model-lifecycle commands load on first use (huggingface_hub, onnx, jinja2 and matplotlib stay out of
# `import imagen` until then).
_LAZY = {"ImagenModel": "imagen.export", "export_run": "imagen.export", "Registry": "imagen.registry",
         "init_registry": "imagen.registry", "refresh": "imagen.registry", "write_report": "imagen.reports"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MODEL_KEYS = {f.name for f in dataclasses.fields(EncoderConfig)}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
# BPE vocabulary of a tokenizer trained for a run that does not start from one.
DEFAULT_VOCAB_SIZE = 1024
# Encoder size when neither the user nor the task's recipe for the data names one.
DEFAULT_PRESET = "tiny"


# ---------------------------------------------------------------------------------------------------
# Training: one path for every task


def launch_processes(nproc: int, argv: Sequence[str]) -> int:
    """Run the command `imagen ARGV` as `nproc` processes on this machine (torchrun --standalone); its exit status."""
    return launch_local(nproc, list(argv))


def finish_processes() -> None:
    """Leave the process group of a multi-process command once every rank has finished it."""
    destroy_processes()


def _split_options(options: dict[str, Any], task_cls) -> tuple[dict, dict, dict]:
    """Separate keyword options into model, train and task config fields (None means "not given")."""
    model, train, task = {}, {}, {}
    task_keys = task_cls.options()
    for key, value in options.items():
        if value is None:
            continue
        if key in TRAIN_KEYS:
            train[key] = value
        elif key in MODEL_KEYS:
            model[key] = value
        elif key in task_keys:
            task[key] = value
        else:
            valid = ", ".join(sorted(task_keys)) or "none"
            raise ConfigError(f"option {key!r} does not apply to the {task_cls.name} task (its options: {valid}); "
                              "training and model options are the TrainConfig and EncoderConfig fields")
    return model, train, task


def _load_splits(spec, seed: int, label: str | None, n: int | None, on_bad_sample: str):
    """(train, val or None) of a dataset; user data too small to carve a val split trains without validation."""
    train = load_dataset(spec, "train", seed=seed, label=label, n=n, on_bad_sample=on_bad_sample)
    try:
        val = load_dataset(spec, "val", seed=seed, label=label, n=n, on_bad_sample=on_bad_sample)
    except DataError:
        val = None
    return train, (val if val is not None and len(val) else None)


def _set_values(sets: Sequence[str], task_cls) -> dict[str, Any]:
    """The values `--set model.KEY=V`, `train.KEY=V` and `<task>.KEY=V` give, by key (parsed as Python literals
    where they are; apply_overrides checks and coerces them later)."""
    values = {}
    for item in sets:
        dotted, _, text = item.partition("=")
        section, _, key = dotted.partition(".")
        if section in ("model", "train", task_cls.name) and key and "." not in key:
            try:
                values[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                values[key] = text
    return values


def _load_init(init_from, model_options: dict, preset: str | None = None) -> LoadedRun | None:
    """The finished run to start from (or None); it fixes the architecture, so only dropout and the image size (its
    position embeddings are resampled to the new patch grid) may be changed."""
    if init_from is None:
        return None
    if preset is not None:
        raise ConfigError(f"--init-from {init_from} fixes the model; drop --preset {preset}")
    if model_options.keys() - INIT_CHANGEABLE:
        raise ConfigError(f"--init-from fixes the model architecture; drop {sorted(model_options.keys() - INIT_CHANGEABLE)}")
    return load(init_from)


INIT_CHANGEABLE = {"dropout", "image_size"}  # model options a fine-tuning run may change from the run it starts from


def _check_init_architecture(init: LoadedRun, model_cfg: EncoderConfig, init_from) -> None:
    changed = [k for k, v in to_dict(model_cfg).items() if k not in INIT_CHANGEABLE and to_dict(init.config.model).get(k) != v]
    if changed:
        raise ConfigError(f"--init-from {init_from} fixes the model architecture; drop the override of model.{changed[0]}")


def _new_run_config(task_cls, data, *, init_from, preset, freeze, n, on_bad_sample, sets, vocab_size, options):
    """Everything a fresh run is made of: (run config, tokenizer, init run, decoded train, decoded val)."""
    model_opts, train_opts, task_opts = _split_options(options, task_cls)
    seed = train_opts.get("seed", TrainConfig.seed)
    init = _load_init(init_from, model_opts, preset)
    recipe = dict(task_cls.recipe)
    shapes_n = recipe.pop("shapes_n", None)
    if n is None and builtin_key(data) == "shapes":
        n = shapes_n
    label = task_cls.data_label(task_cls.Config(**task_opts), data)
    resolve_device(train_opts.get("device", "auto"))  # no such device: say so before reading any data
    train_ds, val_ds = _load_splits(data, seed, label, n, on_bad_sample)
    task_cls.check_data(train_ds, data)
    # The recipe fitted to this data fills what the user left unset (options or --set values). A run started from
    # another keeps that run's model; the recipe fits the rest (its schedule) to the data.
    given = {**_set_values(sets, task_cls), **model_opts, **train_opts, **task_opts,
             **({"preset": preset} if preset is not None else {})}
    fitted, notes = task_cls.fit_recipe(train_ds, data, given, from_run=init is not None)
    preset = preset or fitted.pop("preset", None) or DEFAULT_PRESET
    fit_model, fit_train, fit_task = _split_options(fitted, task_cls)
    model_opts, train_opts = {**fit_model, **model_opts}, {**fit_train, **train_opts}
    for note in notes:
        log.info("recipe: %s", note)
    task_cfg = task_cls.settle(task_cls.Config(**{**fit_task, **task_opts}), train_ds)
    if init is not None:
        model_cfg = dataclasses.replace(init.config.model, **{k: model_opts.get(k, getattr(init.config.model, k))
                                                             for k in INIT_CHANGEABLE})
    else:
        model_cfg = encoder_config(preset, **{"image_size": train_ds.image_size, **model_opts})
    train_cfg = TrainConfig(**{**recipe, **train_opts})
    apply_overrides({"model": model_cfg, "train": train_cfg, task_cls.name: task_cfg}, list(sets))
    if init is not None:
        _check_init_architecture(init, model_cfg, init_from)
    train = task_cls.decode(train_ds, model_cfg.image_size)
    val = task_cls.decode(val_ds, model_cfg.image_size) if val_ds is not None else None
    tokenizer = init.tokenizer if init is not None else None
    if tokenizer is None and task_cls.uses_tokenizer(task_cfg):
        if init is not None:
            raise ConfigError(f"--init-from {init_from} has no tokenizer (an image-only run); the {task_cls.name} "
                              "task needs text: start from a run pretrained on captions, or from scratch")
        tokenizer = Tokenizer.train(task_cls.tokenizer_texts(train[1], task_cfg), vocab_size=vocab_size)
        model_cfg.vocab_size = tokenizer.vocab_size
    rc = RunConfig(task=task_cls.name, model=model_cfg, train=train_cfg, task_config=to_dict(task_cfg),
                   class_names=task_cls.vocabulary(train[1], task_cfg, dataset=train_ds),
                   data={"spec": recorded_spec(data), "seed": seed, "label": label, "n": n},
                   init_from=str(Path(init_from).resolve()) if init_from is not None else None, freeze=freeze)
    return rc, tokenizer, init, train, val


def _resume_changes(rc: RunConfig, task_cls, out: Path, options: dict, sets: Sequence[str], n) -> bool:
    """Fold the options given with --resume into `rc` when they only change how long or how visibly it trains;
    refuse any other difference with the list of them. True when something changed."""
    model_opts, train_opts, task_opts = _split_options(options, task_cls)
    model = dataclasses.replace(rc.model, **model_opts)
    train = dataclasses.replace(rc.train, **train_opts)
    task_cfg = dataclasses.replace(task_cls.config_from(rc.task_config), **task_opts)
    apply_overrides({"model": model, "train": train, task_cls.name: task_cfg}, list(sets))
    changed = [(f"{section}.{k}", v, new[k]) for section, old, new in
               (("model", to_dict(rc.model), to_dict(model)), ("train", to_dict(rc.train), to_dict(train)),
                (task_cls.name, rc.task_config, to_dict(task_cfg)))
               for k, v in old.items() if k in new and new[k] != v]
    if n is not None and n != rc.data.get("n"):
        changed.append(("n", rc.data.get("n"), n))
    check_resume_changes(changed, out)
    for k, old, new in changed:
        log.info("resuming with %s %r (was %r)", k, new, old)
    rc.train = train
    return bool(changed)


def _resumed_run_config(task_cls, out: Path, options: dict, sets: Sequence[str], n):
    """(run config, tokenizer) of a run being resumed, read back from its directory (with the changes --resume allows)."""
    rc = RunConfig.from_json(read_config(out))
    if rc.task != task_cls.name:
        raise RunError(f"{out} is a {rc.task} run; resume it with " + ("`imagen pretrain`" if rc.task == "pretrain" else f"--task {rc.task}"))
    if (out / WEIGHTS_NAME).is_file():
        raise RunError(f"{out} is already finished ({WEIGHTS_NAME} is written); evaluate or predict with it, "
                       "or train a new run into another --out")
    if _resume_changes(rc, task_cls, out, options, sets, n):
        write_json(out / CONFIG_NAME, rc.to_json())  # the run's record says what it was trained with
    return rc, load_tokenizer(out)


def _resumed_splits(task_cls, rc: RunConfig, on_bad_sample: str):
    """The decoded (train, val or None) splits a resumed run trains on."""
    d = rc.data
    train_ds, val_ds = _load_splits(d["spec"], d.get("seed", 0), d.get("label"), d.get("n"), on_bad_sample)
    size = rc.model.image_size
    return task_cls.decode(train_ds, size), (task_cls.decode(val_ds, size) if val_ds is not None else None)


def task_option_names(task: str, finetune: bool = True) -> set[str]:
    """Every keyword `train_task` takes for `task`: TrainConfig and EncoderConfig fields and the task's own options."""
    return TRAIN_KEYS | MODEL_KEYS | get_task(task, finetune=finetune).options()


def task_search_space(task: str, finetune: bool = True) -> dict[str, Any]:
    """The task's default hyperparameter search space (its recipe's neighbourhood; see Task.search_space)."""
    return dict(get_task(task, finetune=finetune).search_space)


def task_metrics(task: str, finetune: bool = True) -> tuple[tuple[str, str], tuple[str, ...]]:
    """(the validation metric a task's training monitors with its direction, the metrics its tables show)."""
    cls = get_task(task, finetune=finetune)
    return tuple(cls.monitor), tuple(cls.headline)


def train_task(task: str, data, out, *, resume: bool = False, finetune: bool = True, init_from=None, preset: str | None = None,
               freeze: str = "none", n: int | None = None, on_bad_sample: str = "skip", sets: Sequence[str] = (),
               vocab_size: int = DEFAULT_VOCAB_SIZE, on_evaluate=None, **options) -> TrainResult:
    """Train any task into a run directory (new, or continued with `resume`); returns the trainer's TrainResult.

    `options` are TrainConfig fields (lr, epochs, ...), EncoderConfig fields (dropout, ...) or the task's own
    options (its Config fields, e.g. label= for classify); `sets` are dotted overrides ("model.dim=96").
    `on_evaluate(step, metrics)` is called after every validation (what a hyperparameter search reports).
    Launched by torchrun, every rank calls this; rank 0 alone writes `out`, and hands the others the run's config.
    """
    task_cls = get_task(task, finetune=finetune)  # unknown task names fail before anything is created
    proc = init_distributed(resolve_device(options.get("device") or "auto"))
    from_main(check_run_dir, Path(out), resume)  # every rank stops on a bad --out, not only the one that writes it
    with open_run(out, resume, writer=proc.is_main) as run:
        out = run.path
        if resume:
            rc, tokenizer = from_main(_resumed_run_config, task_cls, out, options, sets, n)
            init, (train, val) = None, _resumed_splits(task_cls, rc, on_bad_sample)
        else:
            rc, tokenizer, init, train, val = _new_run_config(
                task_cls, data, init_from=init_from, preset=preset, freeze=freeze, n=n, on_bad_sample=on_bad_sample,
                sets=sets, vocab_size=vocab_size, options=options)
            rc, tokenizer = broadcast_object((rc, tokenizer))  # every rank trains what rank 0 records
        task_obj = task_cls(rc, tokenizer)
        train_split = task_obj.build_split(*train, train=True)
        val_split = task_obj.build_split(*val, train=False) if val is not None else None
        seed_everything(rc.train.seed)  # the same command initialises the same weights
        model = task_cls.build_model(rc, tokenizer)
        if init is not None:
            log.info("initialised the %s from %s", task_obj.init_from(model, init), init_from)
        model.encoder.freeze(rc.freeze)
        trainer = Trainer(model, task_obj, train_split, val_split, rc.train, out, collate_fn=task_obj.collate,
                          on_evaluate=on_evaluate)
        if not resume and proc.is_main:
            if tokenizer is not None:
                tokenizer.save(out / TOKENIZER_NAME)
            write_json(out / CONFIG_NAME, rc.to_json())
        run.commit()
        # A run stopped before its first checkpoint starts again from its config (the same seed, the same run).
        checkpointed = from_main(lambda: resume and latest_checkpoint(out) is not None)
        return trainer.fit(resume=checkpointed)


def pretrain(data: str = "shapes", out: str | Path = "runs/pretrain", *, preset: str | None = None, resume: bool = False,
             image_only: bool | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE, n: int | None = None,
             on_bad_sample: str = "skip", sets: Sequence[str] = (), **options) -> TrainResult:
    """Self-supervised pretraining of the multimodal encoder (MLM, MIM, ITC, ITM); returns the TrainResult."""
    return train_task("pretrain", data, out, resume=resume, finetune=False, preset=preset, n=n, on_bad_sample=on_bad_sample,
                      sets=sets, vocab_size=vocab_size, image_only=image_only or None, **options)


def finetune(task: str = "classify", data: str = "shapes", out: str | Path = "runs/finetune", *, init_from=None,
             preset: str | None = None, freeze: str = "none", resume: bool = False, n: int | None = None,
             on_bad_sample: str = "skip", sets: Sequence[str] = (), **options) -> TrainResult:
    """Fine-tune a task head (and, per `freeze`, the encoder) on labelled data; returns the TrainResult.

    `options` take TrainConfig and EncoderConfig fields and the task's own options (e.g. `label="shape"`,
    `label_smoothing=0.1`, `augment="shift"` for classify); unknown names are errors.
    """
    return train_task(task, data, out, resume=resume, init_from=init_from, preset=preset, freeze=freeze, n=n,
                      on_bad_sample=on_bad_sample, sets=sets, **options)


# ---------------------------------------------------------------------------------------------------
# Evaluation and prediction


def _score(loaded: LoadedRun, data: EvalData, report_dir: Path | None = None, echo=print) -> RunScore:
    """A finished run scored by its own task (metrics that are undefined, NaN, come back as None)."""
    task = get_task(loaded.task)(loaded.config, loaded.tokenizer)
    score = task.evaluate_run(loaded.model, data, report_dir=report_dir, echo=echo)
    score.metrics = {k: (None if v != v else v) for k, v in score.metrics.items()}
    return score


def _role(rc: RunConfig) -> str:
    if rc.init_from is None:
        return "from scratch"
    return "pretrained, encoder frozen" if rc.freeze == "encoder" else f"pretrained, fine-tuned (freeze={rc.freeze})"


def evaluate(run: str | Path, data: str | None = None, *, split: str = "test", label: str | None = None,
             compare: Sequence[str | Path] = (), compare_init: bool = True, n: int | None = None,
             on_bad_sample: str = "skip", echo=print) -> dict[str, Any]:
    """A run's metrics on a split, the task's report files in RUN/eval/, and a before/after table with the runs in
    `compare` (and, with `compare_init`, the run it was fine-tuned from, where that scores on the same metrics)."""
    loaded = load(run)
    rc = loaded.config
    task_cls = get_task(rc.task)
    spec = data if data is not None else rc.data.get("spec")
    ev = EvalData(spec=str(spec), split=split, seed=rc.data.get("seed", 0), label=label or rc.data.get("label"), n=n,
                  on_bad_sample=on_bad_sample, class_names=rc.class_names)
    eval_dir = Path(run) / "eval"
    score = _score(loaded, ev, report_dir=eval_dir, echo=echo)
    for k, v in score.metrics.items():
        echo(f"{k:28s} {'n/a' if v is None else format(v, '.4f')}")
    method = {"method": score.method} if score.method else {}
    result: dict[str, Any] = {"run": str(run), "task": rc.task, "data": str(spec), "split": split, **method, "n": score.n,
                              **score.metrics}

    comparable = (rc.task, *task_cls.comparable_with)
    others = [str(c) for c in compare]
    if (compare_init and rc.init_from and Path(rc.init_from).resolve() not in {Path(o).resolve() for o in others}
            and Path(rc.init_from).is_dir()
            and read_config(rc.init_from).get("task") in comparable):
        others.insert(0, rc.init_from)
    if others:
        rows = [{"run": str(run), "role": "this run", **method, **score.metrics}]
        for other in others:
            o = load(other)
            if o.task not in comparable:
                raise RunError(f"--compare {other} is a {o.task} run; compare runs of the same task ({rc.task})")
            s = _score(o, ev, echo=lambda *a, **k: None)
            role = "init (before fine-tuning)" if other == rc.init_from else _role(o.config)
            rows.append({"run": other, "role": role, **({"method": s.method} if s.method else {}), **s.metrics})
        keys = task_cls.headline
        echo(f"{'run':40s} {'role':30s} {'method':13s} " + " ".join(f"{k:>14s}" for k in keys))
        for r in rows:
            echo(f"{r['run'][-40:]:40s} {r['role']:30s} {r.get('method', ''):13s} "
                 + " ".join(f"{r[k]:14.4f}" if r.get(k) is not None else f"{'n/a':>14s}" for k in keys))
        result["comparison"] = rows
    write_json(eval_dir / f"{Path(str(spec)).name}-{split}.json", result)
    return result


def _predict_task(loaded: LoadedRun, n_images: int, inputs: dict[str, Any]):
    """The task class that answers `inputs` for a loaded run, or a one-line error naming what does not fit."""
    task_cls = get_task(loaded.task)
    accepted = task_cls.predict_inputs
    run = loaded.path
    if accepted is None:
        raise RunError(f"{run} is a {loaded.task} run; predict needs a fine-tuned run (imagen finetune --task ...)")
    if not n_images:
        raise DataError("no input files given; pass one or more image paths")
    given = sorted(k for k, v in inputs.items() if v is not None)
    unused = [k for k in given if k not in accepted]
    if unused:
        raise DataError(f"--{unused[0].replace('_', '-')} does not apply to {run}, a {loaded.task} run; "
                        f"{loaded.task} runs take: " + (", ".join(f"--{k.replace('_', '-')}" for k in accepted) or "image files only"))
    return task_cls


def predict_images(loaded: LoadedRun, images: Sequence, names: Sequence[str], top_k: int = 1, **inputs) -> list[dict[str, Any]]:
    """Answers of a loaded run for decoded PIL images (what `predict` and the server share); `names` fill "file"."""
    task_cls = _predict_task(loaded, len(images), inputs)
    size = loaded.config.model.image_size
    batch = torch.stack([image_to_tensor(img, size) for img in images])
    task = task_cls(loaded.config, loaded.tokenizer)
    with torch.no_grad():
        # `sizes`: the pictures' own (width, height), for answers in their pixels (detect's boxes); `names` are only
        # labels (the server's come from clients), never opened
        return task.predict(loaded.model, batch, [str(n) for n in names], top_k=top_k,
                            sizes=[img.size for img in images], **inputs)


def predict(run: str | Path, files: Sequence[str | Path], top_k: int = 1, **inputs) -> list[dict[str, Any]]:
    """Answers of a fine-tuned run for image files: labels (classify), answers (vqa, with question=...),
    captions (caption), responses (instruct, with instruction=...), boxes (detect), best texts (retrieval)."""
    loaded = load(run)
    _predict_task(loaded, len(files), inputs)  # a wrong input fails before any file is read
    return predict_images(loaded, [open_image(f) for f in files], [str(f) for f in files], top_k=top_k, **inputs)
