"""Stop signals: SIGINT and SIGTERM end training at a step boundary with a checkpoint, never mid-update."""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM asked the process to stop: training checkpoints and returns "interrupted"."""

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)


_held: list[int] = []  # stop signals that arrived inside a deferred block
_deferring = 0


def _on_stop_signal(signum, frame):
    if _deferring:
        _held.append(signum)
        return
    raise StopRequested(signum)


@contextlib.contextmanager
def stop_signals_handled():
    """SIGINT and SIGTERM raise StopRequested inside the block (main thread only), whatever handlers were there before.

    Ours replace them even where SIGINT was ignored at start-up (background jobs, some CI runners) and where
    SIGTERM would kill the process outright (docker stop, Kubernetes, Slurm, systemd); both come back after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    if all(h is _on_stop_signal for h in previous.values()):  # inside fit already: no handler swap per step
        yield
        return
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stop_signals_deferred():
    """Hold SIGINT / SIGTERM back until the block ends, then raise StopRequested (a KeyboardInterrupt)."""
    global _deferring
    with stop_signals_handled():
        _deferring += 1
        try:
            yield
        except BaseException:
            _held.clear()  # the block failed on its own; that error is the one to report
            raise
        finally:
            _deferring -= 1
        if _held and not _deferring:
            signum = _held[0]
            _held.clear()
            raise StopRequested(signum)


def pending_stop(clear: bool = False) -> int | None:
    """The stop signal held back inside a deferred block (None when none arrived); `clear` forgets it."""
    signum = _held[0] if _held else None
    if clear:
        _held.clear()
    return signum
