"""Imagen: a multimodal image-text Transformer, self-supervised pretraining, task fine-tuning and
cascaded text-to-image diffusion, in PyTorch."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import imagen` stays cheap, and the CLI's --help never waits on torch.
    if name == "load":
        from imagen.tasks.loading import load

        return load
    if name in ("pretrain", "finetune", "evaluate", "predict"):
        import imagen.api as api

        return getattr(api, name)
    raise AttributeError(f"module 'imagen' has no attribute {name!r}")


__all__ = ["load", "pretrain", "finetune", "evaluate", "predict", "__version__"]
