"""Device placement and mixed precision: the one place that knows about cuda, mps and autocast."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping

import torch

from imagen.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """Turn "auto" | "cpu" | "cuda[:i]" | "mps" into a torch.device, preferring cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} was asked for but there are only {torch.cuda.device_count()} CUDA device(s); "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} was asked for but MPS is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def cpu_name() -> str:
    """The CPU as benchmark figures name it: "AMD EPYC (family 25, model 17)"; models share marketing names."""
    fields = _cpuinfo()
    return (f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')})")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: AMX tiles (Intel) or AVX512-BF16 (recent AMD and Intel).

    Measured on a 2-core AVX512-BF16 machine: a ViT trained 2x faster under bf16 autocast than in fp32.
    Elsewhere bf16 is emulated through fp32 conversions and is slower than plain fp32.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    amx_probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if "AMX" in capability.upper() or bool(amx_probe and amx_probe()):
        return True
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


# On CPU, bf16 autocast pays only once matrix products dominate: measured on a 2-core AVX512-BF16 EPYC
# (bench/throughput.py), the 0.17M-parameter tiny encoder ran at 1369 img/s in bf16 vs 1758 in fp32, the 3M small
# one at 220 vs 132 (before bf16 attention as matrix products, imagen.models.layers.attention). Since then the 0.7M
# `mini` encoder behind a 3-layer stem trains 1.7x faster in bf16 than in fp32 with the same accuracy curve
# (`imagen finetune --task classify --data fashion-mnist --max-steps 80 --precision fp32|bf16`, one core: 250 vs
# 430 images/s). `auto` therefore keeps fp32 on CPU below this many parameters, where it was last measured faster.
CPU_BF16_MIN_PARAMS = 500_000
LEGACY_CPU_BF16_MIN_PARAMS = 1_000_000  # the rule before; checkpoints that predate the recorded precision used it


def resolve_precision(precision: str, device: torch.device, num_params: int | None = None, *,
                      cpu_min_params: int = CPU_BF16_MIN_PARAMS) -> str:
    """Turn "auto" | "fp32" | "bf16" into "fp32" or "bf16" for this device (and, on CPU, this model size)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        small = num_params is not None and num_params < cpu_min_params
        return "bf16" if cpu_has_fast_bf16() and not small else "fp32"
    return "fp32"  # mps bf16 autocast coverage is patchy; fp32 is the safe default there


def channels_last_pays(device: torch.device, precision: str) -> bool:
    """Whether training keeps 4-D weights (convolutions) channels-last: on a CPU without native bf16, in fp32.

    `python bench/cpu_kernels.py` on AVX2-only AMD EPYCs (family 25 model 1), fp32: the text-to-image base U-Net's
    step 1.04-1.09x faster channels-last (two machines), 1.05x with fused AdamW on both sides; the classify encoder
    (a ViT behind a small stem) 1.00-1.05x. On an AVX512-BF16 EPYC in bf16 it cost the U-Net 9 %, so CPUs that train
    in bf16 keep the default layout; GPUs are not measured. Sampling (fp32) follows the same rule: the base U-Net's
    forward pass without gradients ran 1.16-1.24x faster channels-last on the AVX2 EPYC (`--models t2i-sample`).
    """
    return device.type == "cpu" and precision == "fp32" and not cpu_has_fast_bf16()


def autocast_context(device: torch.device, precision: str):
    """A context manager running the forward pass in `precision` ("fp32" -> no autocast, "bf16" -> autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision {precision!r} is not resolved; call resolve_precision first")


def move_to_device(batch, device: torch.device | str):
    """Move every tensor inside nested dicts / lists / tuples to `device`; other leaves are left as they are."""
    if isinstance(batch, torch.Tensor):
        # non_blocking only pays off (and is only safe) for pinned host -> cuda copies.
        return batch.to(device, non_blocking=torch.device(device).type == "cuda")
    if isinstance(batch, Mapping):
        moved = {k: move_to_device(v, device) for k, v in batch.items()}
        return moved if type(batch) is dict else type(batch)(moved)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch) -> int:
    """The size of dim 0 of the first tensor found in a batch (0 when it holds no tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        size = batch_size_of(value)
        if size:
            return size
    return 0


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: allocated CUDA memory on cuda, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # macOS reports bytes, Linux KiB
