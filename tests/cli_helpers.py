"""Helpers shared by the command-line tests: run `imagen` in-process, check a one-line user error."""

from imagen.cli import main


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
