"""Search spaces: the JSON a user writes (or a task's default), checked once, and turned into Optuna suggestions.

    {"lr": {"low": 1e-4, "high": 1e-2, "log": true},   a float range (log-uniform with "log")
     "warmup_steps": {"low": 0, "high": 200},           an integer range (both ends integers; "step" allowed)
     "batch_size": [32, 64, 128]}                       a categorical choice

Each name is an option of the task's training (a TrainConfig or EncoderConfig field, or the task's own option).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from imagen.errors import ConfigError

RANGE_KEYS = {"low", "high", "log", "step", "type"}


def load_space(path: str | Path) -> dict[str, Any]:
    """The search space in a JSON file, with one-line errors for a file that is missing or not a JSON object."""
    path = Path(path)
    try:
        space = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--space {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--space {path} cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--space {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(space, dict):
        raise ConfigError(f"--space {path} must hold a JSON object of option name -> range or list of choices")
    return space


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_space(space: dict[str, Any], options: set[str], where: str = "--space") -> dict[str, Any]:
    """`space` checked entry by entry against the options a trial may set; returns it in a normal form."""
    if not space:
        raise ConfigError(f"{where} is empty; name at least one option to search")
    checked = {}
    for name, spec in space.items():
        if name not in options:
            raise ConfigError(f"{where}: {name!r} is not an option of this task; choose among {', '.join(sorted(options))}")
        if isinstance(spec, list):
            if not spec or not all(isinstance(v, (str, int, float, bool)) or v is None for v in spec):
                raise ConfigError(f"{where}: {name} must list at least one choice of numbers, strings, booleans or null")
            checked[name] = list(spec)
            continue
        if not isinstance(spec, dict) or not {"low", "high"} <= spec.keys() or spec.keys() - RANGE_KEYS:
            raise ConfigError(f"{where}: {name} must be a list of choices or {{\"low\": ..., \"high\": ...}} "
                              f"(optionally \"log\", \"step\", \"type\"), got {json.dumps(spec)}")
        low, high = spec["low"], spec["high"]
        if not (_number(low) and _number(high)) or low > high:
            raise ConfigError(f"{where}: {name} needs numbers low <= high, got low={low!r} high={high!r}")
        kind = spec.get("type", "int" if isinstance(low, int) and isinstance(high, int) else "float")
        if kind not in ("int", "float"):
            raise ConfigError(f"{where}: {name} type {kind!r} must be int or float")
        log = spec.get("log", False)
        if not isinstance(log, bool) or (log and low <= 0):
            raise ConfigError(f"{where}: {name} \"log\" must be true or false, and a log range needs low > 0 (low={low})")
        step = spec.get("step")
        if step is not None and (not _number(step) or step <= 0 or log):
            raise ConfigError(f"{where}: {name} \"step\" must be a positive number, and cannot go with \"log\"")
        checked[name] = {"low": low, "high": high, "log": log, "step": step, "type": kind}
    return checked


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    """One trial's values for every option of a checked space (Optuna's suggest_* calls)."""
    params = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            params[name] = trial.suggest_categorical(name, spec)
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), step=int(spec["step"] or 1),
                                             log=spec["log"])
        else:
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), step=spec["step"],
                                               log=spec["log"])
    return params
