"""The one run lifecycle (runs.open_run), the run config's task options, and the task registry."""

import pytest

import imagen
from imagen.config import EncoderConfig, TrainConfig
from imagen.errors import ConfigError, RunError, UnknownTaskError
from imagen.runs import CONFIG_NAME, LOCK_NAME, RunConfig, open_run
from imagen.tasks.registry import FINETUNE_TASKS, TASKS, get_task


def test_a_failed_setup_removes_what_it_made(tmp_path):
    out = tmp_path / "a" / "run"
    with pytest.raises(ValueError):
        with open_run(out, resume=False) as run:
            (run.path / "tokenizer.json").write_text("{}")
            raise ValueError("bad option")
    assert not out.exists()
    out.mkdir()  # an empty folder given by the user stays, emptied again
    with pytest.raises(KeyboardInterrupt):
        with open_run(out, resume=False) as run:
            (run.path / CONFIG_NAME).write_text("{}")
            raise KeyboardInterrupt
    assert out.is_dir() and [p.name for p in out.iterdir()] == [LOCK_NAME]


def test_setup_refuses_to_overwrite_and_to_resume_nothing(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(RunError, match="not empty"):
        with open_run(tmp_path / "full", resume=False):
            pass
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match="is a file"):
        with open_run(tmp_path / "file" / "run", resume=False):
            pass
    with pytest.raises(RunError, match="cannot resume"):
        with open_run(tmp_path / "nothing", resume=True):
            pass
    assert not (tmp_path / "nothing").exists()


def test_after_commit_a_failure_keeps_the_run(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with open_run(tmp_path / "run", resume=False) as run:
            (run.path / CONFIG_NAME).write_text("{}")
            run.commit()
            raise KeyboardInterrupt  # e.g. during training: the checkpoints are what --resume needs
    assert (tmp_path / "run" / CONFIG_NAME).is_file()


def test_a_second_process_on_the_same_run_is_refused_at_once(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = ("import sys, time; from imagen.runs import open_run\n"
              "with open_run(sys.argv[1], resume=False) as run:\n"
              "    print('held', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"another imagen process \\(pid {proc.pid}\\)"):
            with open_run(out, resume=False):
                pass
    finally:
        proc.kill()
        proc.wait()
    with open_run(out, resume=False) as run:  # a killed holder's lock is gone with it
        assert run.path == out


def test_a_resumed_setup_leaves_the_run_as_it_was_on_failure(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{}")
    with pytest.raises(ValueError):
        with open_run(tmp_path, resume=True):
            raise ValueError
    assert (tmp_path / CONFIG_NAME).read_text() == "{}"


def test_task_options_round_trip_and_earlier_sections_are_read():
    rc = RunConfig(task="classify", model=EncoderConfig(), train=TrainConfig(), task_config={"label": "shape"})
    assert RunConfig.from_json(rc.to_json()).task_config == {"label": "shape"}
    earlier = {"task": "classify", "model": {}, "train": {}, "classify": {"label": "color", "augment": "shift"}}
    assert RunConfig.from_json(earlier).task_config == {"label": "color", "augment": "shift"}


def test_every_registered_task_speaks_the_task_contract():
    from imagen.tasks.base import Task

    for name in TASKS:
        cls = get_task(name)
        assert issubclass(cls, Task) and cls.name == name
    assert "pretrain" not in FINETUNE_TASKS
    with pytest.raises(UnknownTaskError, match="imagen pretrain"):
        get_task("pretrain", finetune=True)
    with pytest.raises(UnknownTaskError, match="available tasks"):
        get_task("segment")


def test_an_option_of_another_task_is_one_clear_error_and_creates_nothing(tmp_path):
    with pytest.raises(ConfigError, match="'label_smoothing' does not apply to the vqa task"):
        imagen.finetune("vqa", "shapes", tmp_path / "run", label_smoothing=0.1, n=16)
    assert not (tmp_path / "run").exists()
