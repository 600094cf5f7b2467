"""`imagen tune`: a study of tiny trials, its best run and table; a search killed mid-trial resumed; two processes
sharing one SQLite study; a bad search space refused with one line."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from cli_helpers import one_line_error, process_tree, run_cli  # noqa: E402
from imagen.tune.search import STUDY_NAME  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
TIMEOUT = 300
TUNE = ["tune", "--task", "classify", "--data", "shapes", "--n", "96", "--label", "shape", "--eval-every", "5",
        "--precision", "fp32", "--device", "cpu", "--report-to", "jsonl",
        "--set", "model.dim=32", "--set", "model.num_layers=2", "--set", "model.num_heads=2"]


def load(out: Path):
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / 'study.db'}")


def imagen_process(*args):
    return subprocess.Popen([sys.executable, "-m", "imagen", *map(str, args)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_three_tiny_trials_make_a_study_a_table_and_a_best_run(capsys, tmp_path, one_thread):
    out = tmp_path / "search"
    code, stdout, err = run_cli(capsys, *TUNE, "--max-steps", "10", "--trials", "3", "--out", out)
    assert code == 0, err
    study = load(out)
    assert len(study.trials) == 3
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 3
    for t in study.trials:  # each trial is an ordinary run directory with its trial.json
        record = json.loads((out / "trials" / f"{t.number:03d}" / "trial.json").read_text())
        assert record["state"] == {"COMPLETE": "complete", "PRUNED": "pruned"}[t.state.name]
        assert (out / "trials" / f"{t.number:03d}" / "model.safetensors").exists() == (record["state"] == "complete")
    best = study.best_trial
    assert (out / "best").resolve() == (out / "trials" / f"{best.number:03d}").resolve()
    import imagen

    loaded = imagen.load(out / "best")  # a finished run like any other
    assert loaded.task == "classify"
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    assert {"state", "accuracy", "minutes", "lr", "batch_size", "weight_decay", "warmup_steps", "dropout"} <= rows[0].keys()
    assert "best: trial" in stdout and "trials.csv" in stdout
    assert isinstance(json.loads((out / "importances.json").read_text()), dict)


def test_a_search_killed_mid_trial_resumes_without_rerunning_finished_trials(tmp_path):
    out = tmp_path / "search"
    args = [*TUNE, "--max-steps", "40", "--trials", "3", "--out", out]
    proc = imagen_process(*args)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (out / "trials" / "001" / "config.json").exists():  # trial 0 done, trial 1 training
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for pid in process_tree(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    first = load(out).trials
    assert first[1].state == optuna.trial.TrialState.RUNNING  # what a killed process leaves in the database
    trial0 = (out / "trials" / "000" / "trial.json").read_text()

    resumed = subprocess.run([sys.executable, "-m", "imagen", *map(str, args), "--resume"], env=ENV, cwd=ROOT,
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    trials = load(out).trials
    assert trials[0].state == first[0].state and trials[0].params == first[0].params
    assert (out / "trials" / "000" / "trial.json").read_text() == trial0  # trial 0 was not run again
    assert trials[1].state == optuna.trial.TrialState.FAIL and 1 in load(out).user_attrs["interrupted"]
    assert json.loads((out / "trials" / "001" / "trial.json").read_text())["state"] == "failed"
    reruns = [t for t in trials if t.user_attrs.get("rerun_of") == 1]
    assert len(reruns) == 1 and reruns[0].params == trials[1].params
    assert reruns[0].state != optuna.trial.TrialState.FAIL
    counted = [t for t in trials if t.state != optuna.trial.TrialState.FAIL]
    assert len(counted) == 3
    assert not [r for r in trials if r.user_attrs.get("rerun_of") == 0]


def test_two_processes_on_one_sqlite_study_share_the_trials(tmp_path):
    out, db = tmp_path / "search", tmp_path / "shared.db"
    args = [*TUNE, "--max-steps", "20", "--trials", "4", "--out", out, "--storage", f"sqlite:///{db}"]
    first = imagen_process(*args)
    while not db.exists():
        assert first.poll() is None, first.communicate()[1]
        time.sleep(0.05)
    second = imagen_process(*args)
    results = [p.communicate(timeout=TIMEOUT) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [err for _, err in results]
    trials = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{db}").trials
    assert len(trials) >= 4 and len({t.number for t in trials}) == len(trials)
    assert not (out / "study.db").exists()  # --storage named the database
    ran = [{int(line.split()[2].rstrip(":")) for line in err.splitlines() if line.startswith("imagen: trial ")
            and "=" in line} for _, err in results]
    assert ran[0] and ran[1] and not ran[0] & ran[1], ran  # both worked, never on the same trial
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)  # distinct settings
    assert all((out / "trials" / f"{t.number:03d}" / "trial.json").is_file() for t in trials)


@pytest.mark.parametrize("space, words", [
    ({"learning_rate": {"low": 1e-4, "high": 1e-2}}, "'learning_rate' is not an option"),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, "low <= high"),
    ({"lr": {"low": 0, "high": 1e-2, "log": True}}, "low > 0"),
    ({"batch_size": []}, "at least one choice"),
    ([1, 2], "JSON object"),
])
def test_a_bad_search_space_is_one_line_and_creates_nothing(capsys, tmp_path, space, words):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    code, _, err = run_cli(capsys, *TUNE, "--trials", "2", "--space", path, "--out", tmp_path / "search")
    line = one_line_error(code, err)
    assert line.startswith("imagen tune: error: --space") and words in line, line
    assert not (tmp_path / "search").exists()


def test_a_searched_option_cannot_also_be_fixed(capsys, tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    code, _, err = run_cli(capsys, *TUNE, "--trials", "2", "--space", path, "--lr", "0.001", "--out", tmp_path / "s")
    assert "both searched and fixed" in one_line_error(code, err)
    assert not (tmp_path / "s").exists()


def test_a_storage_that_is_not_a_database_url_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, *TUNE, "--trials", "2", "--storage", "not a url", "--out", tmp_path / "search")
    assert "--storage 'not a url' is not a database URL" in one_line_error(code, err)
    assert not (tmp_path / "search").exists()
