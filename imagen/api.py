"""The Python API behind the CLI: pretrain, finetune, evaluate and predict, each one function.

    import imagen
    imagen.pretrain(data="shapes", out="runs/pre", max_steps=200)
    imagen.finetune(task="classify", data="shapes", out="runs/cls", init_from="runs/pre", label="color-shape")
    report = imagen.evaluate("runs/cls", data="shapes", split="test")
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from imagen.config import (
    ClassifyConfig,
    ConfigError,
    EncoderConfig,
    PretrainConfig,
    TrainConfig,
    apply_overrides,
    encoder_config,
    to_dict,
)
from imagen.data import DataError, Tokenizer, load_dataset
from imagen.data.splits import build_split
from imagen.runs import (
    TOKENIZER_NAME,
    CONFIG_NAME,
    RunConfig,
    RunError,
    build_model,
    load,
    load_tokenizer,
    check_new_run_dir,
    read_config,
)
from imagen.atomic import write_json as write_json_atomic


def prepare_run_dir(out, resume):
    out = Path(out)
    if resume:
        if not (out / CONFIG_NAME).is_file():
            raise RunError(f"cannot resume: {out} is not a run directory (no {CONFIG_NAME}); start a new run without --resume")
        return out
    check_new_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    return out

from imagen.tasks import get_task

log = logging.getLogger("imagen")

MODEL_KEYS = {f.name for f in dataclasses.fields(EncoderConfig)}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict, dict]:
    """Separate keyword overrides into model and train config fields; anything else is an error."""
    model, train = {}, {}
    for key, value in kwargs.items():
        if value is None:
            continue
        if key in TRAIN_KEYS:
            train[key] = value
        elif key in MODEL_KEYS:
            model[key] = value
        else:
            raise ConfigError(f"unknown option {key!r}")
    return model, train


def _train_config(train_kwargs: dict[str, Any], defaults: dict[str, Any]) -> TrainConfig:
    values = dict(defaults)
    values.update(train_kwargs)
    return TrainConfig(**values)


def _data_info(spec: str, seed: int, label: str | None, n: int | None) -> dict[str, Any]:
    return {"spec": str(spec), "seed": seed, "label": label, "n": n}


def _load_splits(spec, seed, label, n, on_bad_sample, need_val=True):
    train = load_dataset(spec, "train", seed=seed, label=label, n=n, on_bad_sample=on_bad_sample)
    val = None
    if need_val:
        try:
            val = load_dataset(spec, "val", seed=seed, label=label, n=n, on_bad_sample=on_bad_sample)
        except DataError:
            val = None  # user data without a val split and too small to carve one: train without validation
        if val is not None and len(val) == 0:
            val = None
    return train, val


def _fit(rc: RunConfig, model, tokenizer, train_ds, val_ds, out: Path, resume: bool, image_size: int, use_text: bool):
    from imagen.train import Trainer

    task = get_task(rc.task)(rc)
    train_split = build_split(train_ds, image_size, tokenizer, rc.model.max_text_len, rc.class_names, use_text)
    val_split = build_split(val_ds, image_size, tokenizer, rc.model.max_text_len, rc.class_names, use_text) if val_ds is not None else None
    trainer = Trainer(model, task, train_split, val_split, rc.train, out, collate_fn=task.collate)
    return trainer.fit(resume=resume)


def pretrain(
    data: str = "shapes",
    out: str | Path = "runs/pretrain",
    *,
    preset: str = "tiny",
    resume: bool = False,
    image_only: bool = False,
    vocab_size: int = 1024,
    n: int | None = None,
    on_bad_sample: str = "skip",
    sets: Sequence[str] = (),
    **kwargs,
):
    """Self-supervised pretraining of the multimodal encoder; returns the trainer's TrainResult."""
    out = prepare_run_dir(out, resume)
    if resume:
        rc = RunConfig.from_json(read_config(out))
        tokenizer = load_tokenizer(out)
        data_info = rc.data
        train_ds, val_ds = _load_splits(data_info["spec"], data_info["seed"], None, data_info.get("n"), on_bad_sample)
    else:
        model_kwargs, train_kwargs = _split_kwargs(kwargs)
        seed = train_kwargs.get("seed", 0)
        try:
            train_ds, val_ds = _load_splits(data, seed, None, n, on_bad_sample)
            use_text = train_ds.has_text and not image_only
            tokenizer = None
            if use_text:
                tokenizer = Tokenizer.train([t or "" for t in train_ds.texts()], vocab_size=vocab_size)
            model_kwargs.setdefault("image_size", train_ds.image_size)
            if tokenizer is not None:
                model_kwargs["vocab_size"] = tokenizer.vocab_size
            pre = PretrainConfig(image_only=not use_text)
            rc = RunConfig(
                task="pretrain",
                model=encoder_config(preset, **model_kwargs),
                train=_train_config(train_kwargs, {"lr": 1e-3, "weight_decay": 0.05}),
                pretrain=pre,
                data=_data_info(data, seed, None, n),
            )
            apply_overrides({"model": rc.model, "train": rc.train, "pretrain": rc.pretrain}, list(sets))
        except BaseException:
            _remove_if_empty(out)
            raise
        if tokenizer is not None:
            tokenizer.save(out / TOKENIZER_NAME)
        write_json_atomic(out / CONFIG_NAME, rc.to_json())
    model = _build_seeded(rc, tokenizer)
    return _fit(rc, model, tokenizer, train_ds, val_ds, out, resume, rc.model.image_size, use_text=not rc.pretrain.image_only)


def _build_seeded(rc: RunConfig, tokenizer):
    """The run's model, initialised from the run's seed so the same command gives the same weights."""
    from imagen.train import seed_everything

    seed_everything(rc.train.seed)
    return build_model(rc, tokenizer)


def _remove_if_empty(out: Path) -> None:
    """Leave nothing behind when a run fails before writing anything."""
    try:
        out.rmdir()
    except OSError:
        pass


def finetune(
    task: str = "classify",
    data: str = "shapes",
    out: str | Path = "runs/finetune",
    *,
    init_from: str | Path | None = None,
    preset: str = "tiny",
    freeze: str = "none",
    label: str | None = None,
    label_smoothing: float = 0.0,
    augment: str = "none",
    resume: bool = False,
    n: int | None = None,
    on_bad_sample: str = "skip",
    sets: Sequence[str] = (),
    **kwargs,
):
    """Fine-tune a task head (and, per --freeze, the encoder) on labelled data; returns the TrainResult."""
    task_cls = get_task(task)  # unknown task names fail before anything is created
    if task == "pretrain":
        raise ConfigError("use `imagen pretrain` for pretraining")
    if resume:
        _check_resumed_task(out, task)
    if task != "classify":
        given = [flag for flag, used in (("--label", label is not None), ("--label-smoothing", bool(label_smoothing)),
                                         ("--augment", augment != "none")) if used]
        if given:
            raise ConfigError(f"{given[0]} applies to --task classify only; set {task} options with --set {task}.KEY=VALUE")
        return _finetune_task(task_cls, data, out, init_from=init_from, preset=preset, freeze=freeze, resume=resume,
                              n=n, on_bad_sample=on_bad_sample, sets=sets, **kwargs)
    out = prepare_run_dir(out, resume)
    if resume:
        rc = RunConfig.from_json(read_config(out))
        tokenizer = load_tokenizer(out)
        d = rc.data
        train_ds, val_ds = _load_splits(d["spec"], d["seed"], d.get("label"), d.get("n"), on_bad_sample)
        model = _build_seeded(rc, tokenizer)
        model.encoder.freeze(rc.freeze)
        return _fit(rc, model, tokenizer, train_ds, val_ds, out, True, rc.model.image_size, use_text=False)
    try:
        model_kwargs, train_kwargs = _split_kwargs(kwargs)
        seed = train_kwargs.get("seed", 0)
        init = _load_init(init_from, model_kwargs)
        if task == "classify" and label is None and str(data) == "shapes":
            label = "color-shape"
        train_ds, val_ds = _load_splits(data, seed, label, n, on_bad_sample)
        if not train_ds.has_labels or not train_ds.class_names:
            raise DataError(f"data {data!r} has no labels to classify; give a labelled dataset (class folders or a 'label' field)")
        if init is not None:
            model_cfg = dataclasses.replace(init.config.model, dropout=model_kwargs.get("dropout", init.config.model.dropout))
            tokenizer = init.tokenizer
        else:
            model_kwargs.setdefault("image_size", train_ds.image_size)
            model_cfg = encoder_config(preset, **model_kwargs)
            tokenizer = None
        rc = RunConfig(
            task=task,
            model=model_cfg,
            train=_train_config(train_kwargs, {"lr": 1e-3, "weight_decay": 0.05, "epochs": 3}),
            classify=ClassifyConfig(label=label or "label", label_smoothing=label_smoothing, augment=augment),
            class_names=list(train_ds.class_names),
            data=_data_info(data, seed, label, n),
            init_from=str(init_from) if init_from is not None else None,
            freeze=freeze,
        )
        apply_overrides({"model": rc.model, "train": rc.train, "classify": rc.classify}, list(sets))
        model = _build_seeded(rc, tokenizer)
        if init is not None:
            missing = model.encoder.load_state_dict(init.model.encoder.state_dict())
            log.info("initialised the encoder from %s (%s)", init_from, missing)
        model.encoder.freeze(freeze)
    except BaseException:
        _remove_if_empty(out)
        raise
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER_NAME)
    write_json_atomic(out / CONFIG_NAME, rc.to_json())
    return _fit(rc, model, tokenizer, train_ds, val_ds, out, False, rc.model.image_size, use_text=False)


def _load_init(init_from, model_kwargs: dict):
    """The finished run to start from (or None); it fixes the architecture, so only dropout may be changed."""
    if init_from is None:
        return None
    if model_kwargs.keys() - {"dropout"}:
        raise ConfigError(f"--init-from fixes the model architecture; drop {sorted(model_kwargs.keys() - {'dropout'})}")
    return load(init_from)


def _check_resumed_task(out, task: str) -> None:
    previous = read_config(out).get("task") if (Path(out) / CONFIG_NAME).is_file() else None
    if previous is not None and previous != task:
        raise RunError(f"{out} is a {previous} run; resume it with --task {previous}")


def _collect(train_ds, val_ds, image_size: int):
    """((train images, train meta), (val images, val meta) or None), decoded once at the model's image size."""
    from imagen.data.examples import collect

    return collect(train_ds, image_size), (collect(val_ds, image_size) if val_ds is not None else None)


def _finetune_task(task_cls, data, out, *, init_from, preset, freeze, resume, n, on_bad_sample, sets, **kwargs):
    """Fine-tuning for every task but classification: examples from the task, vocabulary fixed at the start."""
    from imagen.train import Trainer

    out = prepare_run_dir(out, resume)
    try:
        if resume:
            rc = RunConfig.from_json(read_config(out))
            tokenizer = load_tokenizer(out)
            d = rc.data
            train, val = _collect(*_load_splits(d["spec"], d["seed"], None, d.get("n"), on_bad_sample), rc.model.image_size)
        else:
            model_kwargs, train_kwargs = _split_kwargs(kwargs)
            seed = train_kwargs.get("seed", 0)
            init = _load_init(init_from, model_kwargs)
            recipe = dict(task_cls.recipe)
            shapes_n = recipe.pop("shapes_n", None)
            if n is None and str(data).lower() == "shapes":
                n = shapes_n
            train_ds, val_ds = _load_splits(data, seed, None, n, on_bad_sample)
            task_cfg = task_cls.Config()
            train_cfg = _train_config(train_kwargs, {"weight_decay": 0.05, **recipe})
            if init is not None:
                model_cfg = dataclasses.replace(init.config.model, dropout=model_kwargs.get("dropout", init.config.model.dropout))
            else:
                model_kwargs.setdefault("image_size", train_ds.image_size)
                model_cfg = encoder_config(preset, **model_kwargs)
            apply_overrides({"model": model_cfg, "train": train_cfg, task_cls.name: task_cfg}, list(sets))
            train, val = _collect(train_ds, val_ds, model_cfg.image_size)
            tokenizer = init.tokenizer if init is not None else None
            if tokenizer is None and task_cls.needs_tokenizer:
                if init is not None:
                    raise ConfigError(f"--init-from {init_from} has no tokenizer (an image-only run); the {task_cls.name} "
                                      "task needs text: start from a run pretrained on captions, or from scratch")
                tokenizer = Tokenizer.train(task_cls.tokenizer_texts(train[1], task_cfg), vocab_size=1024)
                model_cfg.vocab_size = tokenizer.vocab_size
            rc = RunConfig(task=task_cls.name, model=model_cfg, train=train_cfg,
                           class_names=task_cls.vocabulary(train[1], task_cfg), data=_data_info(data, seed, None, n),
                           init_from=str(init_from) if init_from is not None else None, freeze=freeze,
                           task_config=to_dict(task_cfg))
        task = task_cls(rc, tokenizer)
        train_split = task.build_split(*train, train=True)
        val_split = task.build_split(*val, train=False) if val is not None else None
        model = _build_seeded(rc, tokenizer)
        if not resume and init is not None:
            what = task.init_from(model, init)
            log.info("initialised the %s from %s", what, init_from)
        model.encoder.freeze(rc.freeze)
    except BaseException:
        if not resume:
            _remove_if_empty(out)
        raise
    if not resume:
        if tokenizer is not None:
            tokenizer.save(out / TOKENIZER_NAME)
        write_json_atomic(out / CONFIG_NAME, rc.to_json())
    trainer = Trainer(model, task, train_split, val_split, rc.train, out, collate_fn=task.collate)
    return trainer.fit(resume=resume)


def _evaluate_task(loaded, spec, split, seed, n, on_bad_sample):
    """The task's own metrics of a finished run on one split of `spec` (undefined ones, NaN, as None)."""
    from imagen.data.examples import collect

    ds = load_dataset(spec, split, seed=seed, n=n, on_bad_sample=on_bad_sample)
    task = get_task(loaded.task)(loaded.config, loaded.tokenizer)
    examples = task.build_split(*collect(ds, loaded.config.model.image_size), train=False)
    metrics = {k: (None if v != v else v) for k, v in task.evaluate(loaded.model, examples).items()}
    return metrics, len(examples)


def evaluate_task_run(run, data=None, *, split="test", compare=(), n=None, on_bad_sample="skip",
                      echo=print) -> dict[str, Any]:
    """Metrics of a VQA / caption / detection / retrieval / instruct run, with a before/after table."""
    loaded = load(run)
    rc = loaded.config
    spec = data if data is not None else rc.data.get("spec")
    seed = rc.data.get("seed", 0)
    metrics, count = _evaluate_task(loaded, spec, split, seed, n, on_bad_sample)
    task_cls = get_task(rc.task)
    for k, v in metrics.items():
        echo(f"{k:28s} {'n/a' if v is None else format(v, '.4f')}")
    result: dict[str, Any] = {"run": str(run), "task": rc.task, "data": str(spec), "split": split, "n": count, **metrics}
    others = [str(c) for c in compare]
    if others:
        rows = [{"run": str(run), "role": _role(rc), **metrics}]
        for other in others:
            o = load(other)
            if o.task != rc.task:
                raise RunError(f"--compare {other} is a {o.task} run; compare runs of the same task ({rc.task})")
            rows.append({"run": other, "role": _role(o.config), **_evaluate_task(o, spec, split, seed, n, on_bad_sample)[0]})
        keys = task_cls.headline
        echo(f"{'run':40s} {'start':34s} " + " ".join(f"{k:>14s}" for k in keys))
        for r in rows:
            echo(f"{r['run'][-40:]:40s} {r['role']:34s} " + " ".join(f"{r[k]:14.4f}" if r.get(k) is not None else f"{'n/a':>14s}" for k in keys))
        result["comparison"] = rows
    eval_dir = Path(run) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(eval_dir / f"{Path(str(spec)).name}-{split}.json", result)
    return result


def _role(rc: RunConfig) -> str:
    if rc.init_from is None:
        return "from scratch"
    return "pretrained, encoder frozen" if rc.freeze == "encoder" else f"pretrained, fine-tuned (freeze={rc.freeze})"


def _labelled_split(loaded, spec, split, label, seed, n, on_bad_sample, class_names):
    ds = load_dataset(spec, split, seed=seed, label=label, n=n, on_bad_sample=on_bad_sample)
    if not ds.has_labels:
        raise DataError(f"data {spec!r} ({split}) has no labels to evaluate against")
    return build_split(ds, loaded.config.model.image_size, None, loaded.config.model.max_text_len, class_names, use_text=False)


def _score_run(loaded, spec, split, label, seed, n, on_bad_sample, class_names, probe_train_size=5000):
    """(method, targets, preds) for a classification run (its head) or a pretraining run (a linear probe)."""
    from imagen.eval.classification import linear_probe, predict_logits

    test = _labelled_split(loaded, spec, split, label, seed, n, on_bad_sample, class_names)
    if loaded.task == "classify":
        if list(loaded.class_names) != list(class_names):
            raise RunError(f"run {loaded.path} was trained on other classes ({len(loaded.class_names)}) than these ({len(class_names)})")
        return "head", test.labels.numpy(), predict_logits(loaded.model, test.images).argmax(1).numpy()
    train = _labelled_split(loaded, spec, "train", label, seed, n, on_bad_sample, class_names)
    k = min(len(train), probe_train_size)
    preds = linear_probe(loaded.model.encoder, train.images[:k], train.labels[:k].numpy(), test.images, len(class_names), seed)
    return "linear-probe", test.labels.numpy(), preds


def evaluate(
    run: str | Path,
    data: str | None = None,
    *,
    split: str = "test",
    label: str | None = None,
    compare: Sequence[str | Path] = (),
    compare_init: bool = True,
    n: int | None = None,
    on_bad_sample: str = "skip",
    echo=print,
) -> dict[str, Any]:
    """Metrics of a run on a split; a classification report, a confusion matrix PNG and a before/after table."""
    from imagen.eval.classification import classification_metrics, save_confusion_matrix, text_report

    if read_config(run).get("task") not in ("classify", "pretrain"):
        return evaluate_task_run(run, data, split=split, compare=compare, n=n, on_bad_sample=on_bad_sample, echo=echo)
    loaded = load(run)
    rc = loaded.config
    spec = data if data is not None else rc.data.get("spec")
    seed = rc.data.get("seed", 0)
    label = label or rc.data.get("label")
    if rc.task == "pretrain" and label is None and str(spec) == "shapes":
        label = "color-shape"
    class_names = rc.class_names or load_dataset(spec, "train", seed=seed, label=label, n=n).class_names
    if not class_names:
        raise DataError(f"data {spec!r} has no labels; evaluation of a {rc.task} run needs labelled data")

    method, targets, preds = _score_run(loaded, spec, split, label, seed, n, on_bad_sample, class_names)
    metrics = classification_metrics(targets, preds, len(class_names))
    eval_dir = Path(run) / "eval"
    name = f"{Path(str(spec)).name}-{split}"
    png = save_confusion_matrix(targets, preds, class_names, eval_dir / f"{name}-confusion.png", title=f"{Path(run).name} on {spec} ({split})")
    echo(text_report(targets, preds, class_names))
    echo(f"confusion matrix: {png}")
    result: dict[str, Any] = {"run": str(run), "task": rc.task, "data": str(spec), "split": split, "method": method, "n": int(len(targets)), **metrics}

    others = [str(c) for c in compare]
    if compare_init and rc.init_from and rc.init_from not in others and Path(rc.init_from).is_dir():
        others.insert(0, rc.init_from)
    if others:
        rows = [{"run": str(run), "role": "this run", "method": method, **metrics}]
        for other in others:
            o = load(other)
            m, t, p = _score_run(o, spec, split, label, seed, n, on_bad_sample, class_names)
            role = "init (before fine-tuning)" if other == rc.init_from else ("from scratch" if o.config.init_from is None else "other")
            rows.append({"run": other, "role": role, "method": m, **classification_metrics(t, p, len(class_names))})
        echo(f"{'run':40s} {'role':26s} {'method':13s} {'accuracy':>9s} {'macro_f1':>9s}")
        for r in rows:
            echo(f"{r['run'][-40:]:40s} {r['role']:26s} {r['method']:13s} {r['accuracy']:9.4f} {r['macro_f1']:9.4f}")
        result["comparison"] = rows
    eval_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(eval_dir / f"{name}.json", result)
    return result


# The extra inputs each task's predict understands (besides image files and top_k).
PREDICT_INPUTS = {"vqa": ("question",), "instruct": ("instruction", "decoding"), "caption": ("decoding",),
                  "detect": ("out_dir",), "retrieval": ("texts",)}


def predict(run: str | Path, files: Sequence[str | Path], top_k: int = 1, **inputs) -> list[dict[str, Any]]:
    """Answers of a fine-tuned run for image files: labels (classify), answers (vqa, with question=...),
    captions (caption), responses (instruct, with instruction=...), boxes (detect), best texts (retrieval)."""
    from imagen.data import image_to_tensor, open_image
    from imagen.data.images import normalize_images

    loaded = load(run)
    if loaded.task == "pretrain":
        raise RunError(f"{run} is a pretrain run; predict needs a fine-tuned run (imagen finetune --task ...)")
    if not files:
        raise DataError("no input files given; pass one or more image paths")
    size = loaded.config.model.image_size
    images = torch.stack([image_to_tensor(open_image(f), size) for f in files])
    given = sorted(k for k, v in inputs.items() if v is not None)
    unused = [k for k in given if k not in PREDICT_INPUTS.get(loaded.task, ())]
    if unused:
        raise DataError(f"--{unused[0].replace('_', '-')} does not apply to {run}, a {loaded.task} run; "
                        f"{loaded.task} runs take: " + (", ".join(f"--{k.replace('_', '-')}" for k in PREDICT_INPUTS.get(loaded.task, ())) or "image files only"))
    if loaded.task != "classify":
        task = get_task(loaded.task)(loaded.config, loaded.tokenizer)
        return task.predict(loaded.model, images, [str(f) for f in files], top_k=top_k, **inputs)
    with torch.no_grad():
        probs = loaded.model(images=normalize_images(images)).logits.float().softmax(-1)
    results = []
    for f, p in zip(files, probs):
        top = p.topk(min(top_k, len(p)))
        results.append({
            "file": str(f),
            "label": loaded.class_names[int(top.indices[0])],
            "probability": float(top.values[0]),
            "top": [{"label": loaded.class_names[int(i)], "probability": float(v)} for v, i in zip(top.values, top.indices)],
        })
    return results
