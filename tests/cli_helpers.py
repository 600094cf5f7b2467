"""Helpers shared by the command-line tests: run `imagen` in-process, check a one-line user error."""

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
