"""Hugging Face style folders: a finished run as `save_pretrained` / `from_pretrained`, through huggingface_hub's
ModelHubMixin (the pattern of PyTorchModelHubMixin, which timm and many research repos use).

    from imagen.export import ImagenModel
    model = ImagenModel.from_pretrained("exported/cls")       # a local folder (offline), or a Hub repo id
    model.model                                                # the torch.nn.Module, eval mode
    model.run                                                  # the LoadedRun (config, tokenizer, class names)

The folder is a run directory stripped to what inference needs, so `imagen.load(folder)` and every command that
takes `--run` read it as well: config.json (the run's own), model.safetensors, tokenizer.json where the task uses
text, and a model card README.md whose YAML header names the library, task and evaluation results. A text-to-image
run keeps its layout the way a diffusers pipeline folder does: config.json on top, one sub-folder per stage
(config.json + model.safetensors). Nothing is uploaded; `push_to_hub` is the mixin's own, for whoever wants it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin

from imagen.pipelines import TextToImagePipeline
from imagen.runs import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, read_config
from imagen.tasks.loading import LoadedRun, load
from imagen.tasks.text_to_image import TASK as T2I_TASK

# The Hub's task names (pipeline_tag) for each imagen task.
PIPELINE_TAGS = {"classify": "image-classification", "retrieval": "zero-shot-image-classification",
                 "vqa": "visual-question-answering", "caption": "image-to-text", "instruct": "image-text-to-text",
                 "detect": "object-detection", "pretrain": "feature-extraction", T2I_TASK: "text-to-image"}

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

An [imagen](https://github.com/imagen-toolkit/imagen) **{{ task }}** model{{ description }}.

| | |
| --- | --- |
{% for key, value in facts %}| {{ key }} | {{ value }} |
{% endfor %}
{% if metrics %}
## Evaluation

| data | split | {% for k in metric_names %}{{ k }} | {% endfor %}
| --- | --- | {% for k in metric_names %}--- | {% endfor %}
{% for row in metrics %}| {{ row.data }} | {{ row.split }} | {% for k in metric_names %}{{ row.get(k, "") }} | {% endfor %}
{% endfor %}
{% endif %}
## Use

```python
from imagen.export import ImagenModel
model = ImagenModel.from_pretrained("{{ folder }}")   # or: imagen.load("{{ folder }}")
```

{{ usage }}
"""


def _encoder_usage(task: str, folder: str) -> str:
    if task in ("classify", "retrieval", "vqa", "caption", "instruct", "detect"):
        return f"From the command line: `imagen predict --run {folder} picture.png` (see `imagen predict --help`)."
    return "The encoder is `model.model.encoder` (`imagen.models.MultimodalEncoder`)."


def _eval_rows(run: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Evaluation results the run recorded in eval/*.json (imagen evaluate), headline metrics first."""
    rows, names = [], []
    for path in sorted((run / "eval").glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(result, dict) or "split" not in result:
            continue
        metrics = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
        for k in metrics:
            if k not in names and k != "loss":
                names.append(k)
        rows.append({"data": result.get("data", ""), "split": result["split"], **metrics})
    return rows, names[:6]


class ImagenModel(ModelHubMixin, library_name="imagen", tags=["imagen", "pytorch"], license="apache-2.0",
                  model_card_template=CARD_TEMPLATE):
    """A finished imagen run (a LoadedRun, or a TextToImagePipeline for a text-to-image run) that saves itself as a
    Hugging Face style folder and loads back from one."""

    def __init__(self, run: LoadedRun | TextToImagePipeline):
        self.run = run

    @property
    def path(self) -> Path:
        return Path(self.run.path)

    @property
    def task(self) -> str:
        return T2I_TASK if isinstance(self.run, TextToImagePipeline) else self.run.task

    @property
    def model(self):
        """The torch module: the run's model, or the pipeline itself for a text-to-image run."""
        return self.run if isinstance(self.run, TextToImagePipeline) else self.run.model

    # -- saving ----------------------------------------------------------------------------------------------

    def _save_pretrained(self, save_directory: Path) -> None:
        src = self.path
        if self.task == T2I_TASK:
            config = json.loads((src / CONFIG_NAME).read_text())
            for name in config["stages"]:
                (save_directory / name).mkdir(parents=True, exist_ok=True)
                for file in (CONFIG_NAME, WEIGHTS_NAME):
                    shutil.copy2(src / name / file, save_directory / name / file)
        else:
            config = read_config(src)
            config["init_from"] = None  # a path on the machine that trained it; the card names the run instead
            shutil.copy2(src / WEIGHTS_NAME, save_directory / WEIGHTS_NAME)
        (save_directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if (src / TOKENIZER_NAME).is_file():
            shutil.copy2(src / TOKENIZER_NAME, save_directory / TOKENIZER_NAME)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        folder = kwargs.pop("folder", self.path.name)
        rows, names = _eval_rows(self.path)
        if self.task == T2I_TASK:
            config = self.run.config
            facts = [("stages", ", ".join(f"{s} ({config['stage_configs'][s]['unet']['image_size']}px)" for s in config["stages"])),
                     ("text encoder", config["text_encoder"].get("kind", "")), ("training data", config.get("data", {}).get("spec", ""))]
            description = ": a cascade of text-conditioned Efficient U-Nets (Imagen)"
            usage = f"From the command line: `imagen generate --run {folder} \"a red circle\" --out grid.png`."
        else:
            rc = self.run.config
            m = rc.model
            facts = [("encoder", f"{m.num_layers} layers, dim {m.dim}, {m.num_heads} heads, {m.image_size}px images, patch {m.patch_size}"),
                     ("training data", rc.data.get("spec", "")), ("fine-tuned from", Path(rc.init_from).name if rc.init_from else "scratch")]
            if rc.class_names:
                shown = ", ".join(rc.class_names[:12]) + (" ..." if len(rc.class_names) > 12 else "")
                facts.append(("classes", f"{len(rc.class_names)}: {shown}"))
            description = ": a multimodal Transformer encoder with a task head"
            usage = _encoder_usage(self.task, folder)
        card_data = ModelCardData(library_name="imagen", license="apache-2.0", tags=["imagen", "pytorch", self.task],
                                  pipeline_tag=PIPELINE_TAGS.get(self.task))
        return ModelCard.from_template(card_data, template_str=CARD_TEMPLATE, name=folder, task=self.task, description=description,
                                       facts=facts, metrics=rows, metric_names=names, folder=folder, usage=usage)

    # -- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", **model_kwargs) -> "ImagenModel":
        folder = model_id
        if not os.path.isdir(folder):  # a Hub repo id: the mixin's download path (offline: its cache only)
            from huggingface_hub import snapshot_download

            folder = snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                       local_files_only=local_files_only, token=token)
        return cls.from_folder(folder, map_location=map_location)

    @classmethod
    def from_folder(cls, folder: str | Path, map_location: str = "cpu") -> "ImagenModel":
        """A run directory or an exported folder, loaded without the Hub machinery."""
        folder = Path(folder)
        if is_t2i_run(folder):
            return cls(TextToImagePipeline.from_run(folder, device=map_location))
        return cls(load(folder, map_location=map_location))


def is_t2i_run(run: Path) -> bool:
    """True when `run` holds a text-to-image run's config.json."""
    try:
        return json.loads((Path(run) / CONFIG_NAME).read_text()).get("task") == T2I_TASK
    except (OSError, ValueError, AttributeError):
        return False
