"""What a search leaves behind: DIR/trials.csv and the printed table, DIR/best, parameter importances."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import optuna
from optuna.trial import TrialState

from imagen.atomic import write_text

STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def _minutes(trial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds() / 60


def trial_rows(study: optuna.Study, metric: str) -> list[dict]:
    """One row per trial: number, state, metric, minutes, then every searched parameter."""
    names = sorted({name for t in study.trials for name in t.params})
    rows = []
    for t in study.trials:
        minutes = _minutes(t)
        value = t.value if t.state == TrialState.COMPLETE else (t.intermediate_values[max(t.intermediate_values)]
                                                                if t.intermediate_values else None)
        rows.append({"trial": t.number, "state": STATE_NAMES.get(t.state, t.state.name.lower()),
                     metric: value, "minutes": None if minutes is None else round(minutes, 2),
                     **{name: t.params.get(name) for name in names}})
    return rows


def write_trials_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, buffer.getvalue())


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (numbers to 4 significant digits)."""
    if not rows:
        return "no trials"

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    names = list(rows[0])
    cells = [[cell(r[n]) for n in names] for r in rows]
    widths = [max(len(n), *(len(c[i]) for c in cells)) for i, n in enumerate(names)]
    lines = ["  ".join(n.rjust(w) for n, w in zip(names, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def link_best(out: Path, run: Path) -> Path:
    """DIR/best -> the best trial's run directory (a relative symbolic link, replaced atomically)."""
    best = out / "best"
    tmp = out / ".best.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(run, out), tmp)
    os.replace(tmp, best)
    return best


def importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importances of the searched parameters over the finished trials ({} with too few to tell)."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    varied = {name for name in {n for t in complete for n in t.params}
              if len({json.dumps(t.params.get(name)) for t in complete}) > 1}
    if len(complete) < 2 or not varied:
        return {}
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # fANOVA (Hutter et al. 2014), repeatable
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator, params=sorted(varied)))
    except (RuntimeError, ValueError):  # e.g. every finished trial scored the same
        return {}
