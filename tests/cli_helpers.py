"""Helpers shared by the command-line tests: run `imagen` in-process, check a one-line user error, interrupt a run."""

from pathlib import Path

from safetensors.torch import load_file

from imagen.cli import main

# A tiny encoder for command-line runs that only have to work, not learn.
TINY = ["--set", "model.dim=32", "--set", "model.num_layers=2", "--set", "model.num_heads=2", "--no-progress", "--batch-size", "16"]


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `imagen ARGV...`."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, ignore_logs=False):
    """Assert a non-zero exit with exactly one error line and no traceback; return that line.

    `ignore_logs` skips the "imagen: ..." progress lines a command may log before it fails.
    """
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip() and not (ignore_logs and l.startswith("imagen: "))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def interrupt_then_resume(capsys, monkeypatch, task_cls, args, out, at, unfinished="model.safetensors"):
    """Run `imagen ARGS --out OUT` with Ctrl-C at the `at`-th training step of `task_cls`, then finish it with --resume.

    `unfinished` (a path under OUT) must not exist after the interruption: the final weights are not written yet.
    """
    original = task_cls.training_step
    calls = {"n": 0}

    def interrupt(self, model, batch):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(task_cls, "training_step", interrupt)
    code, _, err = run_cli(capsys, *args, "--out", out)
    assert code == 130 and "--resume" in err, err
    assert not (out / unfinished).exists()
    monkeypatch.setattr(task_cls, "training_step", original)
    code, _, err = run_cli(capsys, *args, "--out", out, "--resume")
    assert code == 0, err


def assert_same_weights(a_path, b_path):
    """The two weight files hold the same tensors, bit for bit."""
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        except (ValueError, OSError, IndexError):
            continue
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree
