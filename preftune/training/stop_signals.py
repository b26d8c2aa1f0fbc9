"""The signals that stop a run cleanly: SIGTERM and SIGUSR1 (a cluster's preemption notice) and SIGINT
(Ctrl-C). The first of them asks the trainer to validate, save and stop after the current step; a second
Ctrl-C stops the process at once, without saving (the newest checkpoint is where it resumes)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a process Ctrl-C ended
EXIT_STOPPED = 75  # stopped early and cleanly (a stop signal, trainer.max_time): the same command resumes

Handler = Callable[[int, Any], None]


def install(handler: Handler) -> dict[int, Any]:
    """Route the stop signals to ``handler``; return the handlers they had (none outside the main thread,
    where Python cannot install any)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    return previous


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers ``install`` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def on_stop_signal(signum: int, *, again: bool, announce: bool) -> None:
    """Tell the person who pressed Ctrl-C what happens now; on a second Ctrl-C, exit at once. (os.write:
    a signal handler may run in the middle of a print.)"""
    if signum != signal.SIGINT:
        return
    if again:
        if announce:
            os.write(2, b"\n[preftune] interrupted again: stopped at once, without saving\n")
        os._exit(EXIT_INTERRUPTED)
    if announce:
        os.write(
            2,
            b"\n[preftune] interrupted: validating, saving and stopping after this step "
            b"(Ctrl-C again to stop at once, without saving)\n",
        )
