"""`imagen tune`: a hyperparameter search on Optuna, each trial an ordinary run directory trained by imagen.api.

    DIR/tune.json        what the search is (task, data, metric, space, fixed options, storage); a second process
                         given the same DIR and options joins the search
    DIR/study.db         the Optuna study (SQLite) unless --storage names another database (any SQLAlchemy URL)
    DIR/trials/NNN/      trial NNN's run directory, with trial.json (its state, parameters and metric)
    DIR/trials.csv       one row per trial: state, metric, minutes, parameters
    DIR/best             a link to the best trial's run directory
    DIR/importances.json the parameters' importances (fANOVA) over the finished trials

The sampler is TPE; the median pruner stops a trial whose validation metric, at any evaluation, falls below the
median of earlier trials at that step. A pruned trial keeps its run directory without model.safetensors (never
mistaken for a finished run) and says "pruned" in its trial.json.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

import imagen.api as api
from imagen.atomic import write_json
from imagen.errors import ConfigError, RunError, TrainingError

from .report import STATE_NAMES, format_table, importances, link_best, trial_rows, write_trials_csv
from .space import check_space, suggest

log = logging.getLogger("imagen")

SETTINGS_FILE = "tune.json"
STUDY_NAME = "imagen-tune"
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"


@dataclass
class TuneSettings:
    """One search: the task and data, how many trials, what to search, where the study lives; `fixed` holds the
    training options every trial shares (train_task keywords: max_steps, n, init_from, sets, ...)."""

    task: str
    data: str
    out: Path
    trials: int
    space: dict[str, Any] | None = None  # None: the task's default search space
    metric: str | None = None  # None: the metric the task's training monitors
    timeout_min: float | None = None
    storage: str | None = None  # None: sqlite:///DIR/study.db
    resume: bool = False
    seed: int = 0
    fixed: dict[str, Any] = field(default_factory=dict)


@dataclass
class TuneResult:
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    rows: list[dict]
    importances: dict[str, float]


def _direction(task: str, metric: str | None) -> tuple[str, str]:
    """(metric, "maximize" | "minimize") for the task, refusing a metric it does not report."""
    (monitor, mode), headline = api.task_metrics(task)
    metric = metric or monitor
    known = dict.fromkeys([monitor, *headline, "loss"])
    if metric not in known:
        raise ConfigError(f"--metric {metric!r} is not a validation metric of the {task} task; choose {', '.join(known)}")
    if metric == monitor:
        return metric, "maximize" if mode == "max" else "minimize"
    return metric, "minimize" if "loss" in metric else "maximize"


def _storage_url(settings: TuneSettings) -> str:
    if settings.storage is None:
        return f"sqlite:///{(settings.out / 'study.db').resolve()}"
    try:
        sqlalchemy.engine.make_url(settings.storage)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"--storage {settings.storage!r} is not a database URL (e.g. sqlite:///study.db, "
                          "postgresql://user@host/db)") from None
    return settings.storage


def _record(settings: TuneSettings, space: dict, metric: str, direction: str) -> dict[str, Any]:
    """What tune.json says the search is; every process working on it must agree."""
    return {"task": settings.task, "data": str(settings.data), "metric": metric, "direction": direction, "space": space,
            "fixed": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(settings.fixed.items())},
            "storage": settings.storage, "study": STUDY_NAME}


def _prepare_dir(settings: TuneSettings, record: dict) -> None:
    """Create DIR and its tune.json, or check that the search already there is this one."""
    out = settings.out
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise RunError(f"{path} is damaged; start the search in a new --out") from None
        differ = [k for k in record if k != "storage" and saved.get(k) != record[k]]
        if differ:
            raise RunError(f"--out {out} holds another search (its {', '.join(differ)} differ); give the same options to "
                           "join or resume it, or choose a new --out")
        return
    if settings.resume:
        raise RunError(f"cannot resume: {out} holds no search ({SETTINGS_FILE} is missing); start one without --resume")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"--out {out} already exists and is not a search directory; choose a new directory")
    try:
        (out / TRIALS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {out}: cannot create it ({e.strerror}); choose a folder you can write to") from None
    write_json(path, record)


def _worker_index(out: Path) -> int:
    """How many processes joined this search before this one (the sampler's seed offset: joiners sample differently)."""
    with open(out / ".workers", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        index = len(f.read().splitlines())
        f.write(f"{os.getpid()}\n")
        return index


def _open_study(url: str, direction: str, seed: int) -> optuna.Study:
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot open the study database {url!r}: {reason}") from None
    try:
        return optuna.create_study(study_name=STUDY_NAME, storage=storage, direction=direction, load_if_exists=True,
                                   sampler=optuna.samplers.TPESampler(seed=seed),
                                   pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    except ValueError as e:  # an existing study with the other direction
        raise ConfigError(f"the study in {url} cannot be used: {e}") from None


def _trial_dir(out: Path, number: int) -> Path:
    return out / TRIALS_DIR / f"{number:03d}"


def _write_trial(out: Path, number: int, state: str, params: dict, metric: str, value=None, note=None) -> None:
    run = _trial_dir(out, number)
    if run.is_dir():
        write_json(run / TRIAL_FILE, {"trial": number, "state": state, "params": params, metric: value,
                                      **({"note": note} if note else {})})


def _interrupted(study: optuna.Study) -> set[int]:
    """Trials stopped by a signal (their own process marked them) or found dead by --resume (the study records them)."""
    marked = {t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get("interrupted")}
    return marked | set(study.user_attrs.get("interrupted", []))


def _counted(study: optuna.Study) -> int:
    """Trials that count toward --trials: finished ones, pruned ones, and failures that were not interruptions."""
    interrupted = _interrupted(study)
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in interrupted) for t in study.get_trials(deepcopy=False))


def _recover(study: optuna.Study, out: Path, metric: str) -> None:
    """--resume: trials left running by a process that died are marked failed, and every interrupted trial not
    re-run yet is queued again with its parameters. A trial whose run directory is locked is still being worked on."""
    dead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not api.run_in_use(_trial_dir(out, t.number))]
    if dead:
        study.set_user_attr("interrupted", sorted(set(study.user_attrs.get("interrupted", [])) | {t.number for t in dead}))
    for t in dead:
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        _write_trial(out, t.number, "failed", t.params, metric, note="interrupted; re-run by --resume")
        log.info("trial %d was interrupted; marked failed", t.number)
    trials = study.get_trials(deepcopy=False)
    interrupted = _interrupted(study)
    rerun = {t.user_attrs.get("rerun_of") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and t.number in interrupted and t.number not in rerun:
            study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number})
            log.info("trial %d will run again with the same parameters", t.number)


class _Objective:
    """One trial: its parameters, an ordinary training run in DIR/trials/NNN, pruning at each evaluation."""

    def __init__(self, settings: TuneSettings, space: dict, metric: str):
        self.settings, self.space, self.metric = settings, space, metric
        self.monitor = api.task_metrics(settings.task)[0][0]

    def __call__(self, trial: optuna.Trial) -> float:
        s, metric = self.settings, self.metric
        params = suggest(trial, self.space)
        run = _trial_dir(s.out, trial.number)
        trial.set_user_attr("run", str(run))

        def report(step: int, metrics: dict[str, float]) -> None:
            if metric not in metrics:
                raise ConfigError(f"--metric {metric!r} is not among the {s.task} task's validation metrics "
                                  f"({', '.join(sorted(metrics))})")
            value = metrics[metric]
            if math.isfinite(value):
                trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {value:.4f} at step {step}")

        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={_short(v)}" for k, v in params.items()))
        try:
            result = api.train_task(s.task, s.data, run, on_evaluate=report, **{**s.fixed, **params})
        except optuna.TrialPruned as e:
            _write_trial(s.out, trial.number, "pruned", params, metric, note=str(e))
            log.info("trial %d pruned (%s)", trial.number, e)
            raise
        except TrainingError as e:  # this trial's settings diverged: the search goes on
            _write_trial(s.out, trial.number, "failed", params, metric, note=str(e))
            log.info("trial %d failed: %s", trial.number, e)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            _write_trial(s.out, trial.number, "failed", params, metric, note="interrupted; re-run by --resume")
            raise
        if result.status == "interrupted":
            trial.set_user_attr("interrupted", True)
            _write_trial(s.out, trial.number, "failed", params, metric, note="interrupted; re-run by --resume")
            log.info("trial %d interrupted; `imagen tune ... --resume` runs it again", trial.number)
            raise KeyboardInterrupt(result.stopped_by or "SIGINT")
        value = result.best_metric if metric == self.monitor and result.best_metric is not None else result.metrics.get(metric)
        if value is None:
            raise ConfigError(f"trial {trial.number} ran no validation, so it has no {metric}; give the task validation "
                              "data (a val split, or data large enough to carve one)")
        _write_trial(s.out, trial.number, "complete", params, metric, value)
        log.info("trial %d: %s %.4f", trial.number, metric, value)
        return value


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def tune(settings: TuneSettings, echo=print) -> TuneResult:
    """Run (or join, or resume) a search until the study holds `settings.trials` trials or the time is up; then
    write DIR/trials.csv, DIR/best and DIR/importances.json and echo the table."""
    if settings.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {settings.trials}")
    if settings.timeout_min is not None and not settings.timeout_min > 0:
        raise ConfigError(f"--timeout-min must be positive, got {settings.timeout_min}")
    options = api.task_option_names(settings.task)
    metric, direction = _direction(settings.task, settings.metric)
    space = check_space(settings.space if settings.space is not None else api.task_search_space(settings.task),
                        options, where="--space" if settings.space is not None else f"the {settings.task} search space")
    both = sorted(set(space) & {k for k, v in settings.fixed.items() if v is not None})
    if both:
        raise ConfigError(f"{', '.join(both)} is both searched and fixed; drop --{both[0].replace('_', '-')} or remove it "
                          "from the search space")
    url = _storage_url(settings)
    _prepare_dir(settings, _record(settings, space, metric, direction))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial of our own instead (no tracebacks)
    study = _open_study(url, direction, settings.seed + _worker_index(settings.out))
    if settings.resume:
        _recover(study, settings.out, metric)

    def enough(study: optuna.Study, _trial=None) -> bool:
        done = _counted(study)
        if done >= settings.trials:
            study.stop()
        return done >= settings.trials

    if not enough(study):
        study.optimize(_Objective(settings, space, metric), timeout=None if settings.timeout_min is None
                       else settings.timeout_min * 60, callbacks=[enough], catch=(TrainingError,),
                       gc_after_trial=True)
    return _summarise(study, settings.out, metric, echo)


def _summarise(study: optuna.Study, out: Path, metric: str, echo) -> TuneResult:
    rows = trial_rows(study, metric)
    write_trials_csv(out / "trials.csv", rows)
    echo(format_table(rows))
    best = None
    try:
        best = study.best_trial
    except ValueError:  # no trial finished
        echo("no trial finished; nothing to link as best")
    if best is not None:
        link_best(out, _trial_dir(out, best.number))
        echo(f"best: trial {best.number}, {metric} {best.value:.4f} ({', '.join(f'{k}={_short(v)}' for k, v in best.params.items())}); "
             f"run linked as {out / 'best'}")
    found = importances(study)
    write_json(out / "importances.json", found)
    if found:
        echo("parameter importances (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in found.items()))
    counts = {}
    for t in study.trials:
        name = STATE_NAMES.get(t.state, t.state.name.lower())
        counts[name] = counts.get(name, 0) + 1
    echo("trials: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + f"; table in {out / 'trials.csv'}")
    return TuneResult(best.number if best else None, best.value if best else None, dict(best.params) if best else {},
                      rows, found)
