"""`imagen report`: one self-contained HTML page about finished runs, side by side.

    imagen report runs/cls --compare runs/cls-scratch --out report.html

The page holds the runs' config and data; training and validation curves per stage (loss, learning rate and
every logged metric, every run on the same axes); evaluation tables with the before/after comparison that
`imagen evaluate` recorded; confusion matrices; and for text-to-image runs the sample grids of the fixed
validation prompts over training and `imagen evaluate-t2i`'s compositional accuracy and FID. Pictures are PNGs
(matplotlib) embedded as base64 and the page is a jinja2 template with inline CSS: no JavaScript, no network,
so the file can be opened from disk or attached to a message.
"""

from __future__ import annotations

import base64
import time
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import jinja2

from imagen.atomic import write_text
from imagen.errors import ConfigError
from imagen.reports.collect import RunRecord, curve_keys, flatten, read_run
from imagen.reports.plots import COLORS, bars_png, curve_png

REPORT_NAME = "report.html"
T2I_EVAL_PREFIX = "t2i-"
# Config keys that say where things are on the machine that trained, not how the run was trained.
NOT_SHOWN = ("class_names",)

__all__ = ["write_report", "build_report", "read_run", "REPORT_NAME"]


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def _config_groups(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """One settings table per task: runs of one task side by side, where their settings can be compared."""
    tasks: list[str] = []
    for r in runs:
        tasks.extend([r.task] if r.task not in tasks else [])
    groups = []
    for task in tasks:
        members = [r for r in runs if r.task == task]
        groups.append({"task": task, "runs": [r.name for r in members], "rows": _config_rows(members)})
    return groups


def _config_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    flats = [{k: v for k, v in flatten(r.config).items() if k.split(".")[0] not in NOT_SHOWN} for r in runs]
    keys: list[str] = []
    for flat in flats:
        keys.extend(k for k in flat if k not in keys)
    rows = []
    for k in keys:
        values = [_fmt(flat.get(k, "")) for flat in flats]
        rows.append({"key": k, "values": values, "differs": len(set(values)) > 1})
    return rows


def _data_rows(run: RunRecord) -> list[tuple[str, str]]:
    d = run.data
    rows = [(k, _fmt(v)) for k, v in d.items()]
    names = run.config.get("class_names")
    if names:
        rows.append(("classes", f"{len(names)}: " + ", ".join(map(str, names[:24])) + (" ..." if len(names) > 24 else "")))
    if run.config.get("init_from"):
        rows.append(("initialised from", Path(str(run.config["init_from"])).name))
    return rows


def _curves(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """Per stage (in order of first appearance), one plot per metric with every run that logged it."""
    stage_names: list[str] = []
    for r in runs:
        stage_names.extend(s.name for s in r.stages if s.name not in stage_names)
    sections = []
    for stage in stage_names:
        series = [(r.name, i, s.records) for i, r in enumerate(runs) for s in r.stages if s.name == stage and s.records]
        keys: list[str] = []
        for _, _, records in series:
            keys.extend(k for k in curve_keys(records) if k not in keys)
        plots = [(k, png) for k in keys if (png := curve_png(k, series)) is not None]
        last = {name: records[-1]["step"] for name, _, records in series}
        sections.append({"name": stage or "training", "plots": [(k, _b64(p)) for k, p in plots], "last_steps": last})
    return sections


def _metric_items(result: dict[str, Any]) -> list[tuple[str, str]]:
    skip = {"file", "run", "task", "data", "split", "comparison", "method", "n"}
    return [(k, _fmt(v)) for k, v in result.items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]


def _comparison(result: dict[str, Any]) -> dict[str, Any] | None:
    rows = result.get("comparison")
    if not rows:
        return None
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k, v in row.items() if k not in ("run", "role", "method") and k not in keys
                    and (v is None or isinstance(v, (int, float))))
    return {"keys": keys, "rows": [{"run": Path(str(r.get("run", ""))).name, "role": r.get("role", ""),
                                    "values": [_fmt(r.get(k)) for k in keys]} for r in rows]}


def _evaluations(run: RunRecord, t2i: bool) -> list[dict[str, Any]]:
    chosen = [e for e in run.evals if e["file"].startswith(T2I_EVAL_PREFIX) == t2i]
    return [{"file": e["file"], "data": e.get("data", ""), "split": e.get("split", ""), "n": e.get("n", e.get("fid_samples", "")),
             "metrics": _metric_items(e), "comparison": _comparison(e)} for e in chosen]


def _side_by_side(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """For each evaluation file that several runs hold (same data, same split): their metrics side by side."""
    by_file: dict[str, list[tuple[int, RunRecord, dict[str, Any]]]] = {}
    for i, r in enumerate(runs):
        for e in r.evals:
            by_file.setdefault(e["file"], []).append((i, r, e))
    tables = []
    for file, entries in by_file.items():
        if len(entries) < 2:
            continue
        keys: list[str] = []
        for _, _, e in entries:
            keys.extend(k for k, _ in _metric_items(e) if k not in keys)
        rows = [{"run": r.name, "values": [_fmt(e.get(k)) for k in keys]} for _, r, e in entries]
        head = keys[0] if keys else None
        bars = [(r.name, i, float(e[head])) for i, r, e in entries if isinstance(e.get(head), (int, float))] if head else []
        tables.append({"file": file, "keys": keys, "rows": rows,
                       "plot": _b64(bars_png(head, bars)) if len(bars) >= 2 else None, "metric": head})
    return tables


def build_report(runs: Sequence[str | Path], title: str | None = None) -> str:
    """The HTML text of a report on `runs` (the first is the one reported on, the others compared with it)."""
    records = [read_run(r) for r in runs]
    if len({r.name for r in records}) < len(records):  # two runs with one folder name: add their parents'
        for r in records:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    runs_ctx = []
    for i, r in enumerate(records):
        runs_ctx.append({
            "name": r.name, "path": str(r.path), "task": r.task, "finished": r.finished, "color": COLORS[i % len(COLORS)],
            "data": _data_rows(r), "evaluations": _evaluations(r, t2i=False), "t2i_evaluations": _evaluations(r, t2i=True),
            "confusion": [(f, _b64(png)) for f, png in r.eval_images if "confusion" in f],
            "eval_grids": [(f, _b64(png)) for f, png in r.eval_images if "confusion" not in f],
            "samples": [{"stage": s.name, "grids": [(step, _b64(png)) for step, png in s.grids]} for s in r.stages if s.grids],
        })
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True) \
        .from_string(resources.files("imagen.reports").joinpath("templates/report.html").read_text(encoding="utf-8"))
    return template.render(
        title=title or ("imagen report: " + " vs ".join(r.name for r in records)),
        generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        runs=runs_ctx, compare=len(records) > 1, config_groups=_config_groups(records), curves=_curves(records),
        side_by_side=_side_by_side(records),
    )


def write_report(run: str | Path, compare: Sequence[str | Path] = (), out: str | Path | None = None) -> Path:
    """Write the report on `run` (compared with the runs in `compare`) to `out` (default RUN/report.html)."""
    out = Path(out) if out is not None else Path(run) / REPORT_NAME
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the HTML file to write, e.g. {out / REPORT_NAME}")
    html = build_report([run, *compare])
    return write_text(out, html)
