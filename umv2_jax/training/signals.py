"""SIGTERM and SIGINT (Ctrl-C) stop a run at a safe point, in every phase of it.

    with signals.handling():                    # the CLI enters it first thing; train() nests
        signals.raise_if_requested()            # start-up: StopRequested, nothing trained yet
        signals.set_phase("evaluation at step 4")
        if signals.requested(): ...             # loop: finish the step, save it, return

The handler only records the signal and the phase it arrived in; it never raises. A
KeyboardInterrupt raised inside JAX dispatch or while orbax's asynchronous save threads are
running is what made Ctrl-C during an evaluation segfault; a flag read at safe points cannot.
A second Ctrl-C is the escape hatch: it exits at once (status 130) without saving, which loses
at most the steps since the last checkpoint (a checkpoint being written is left as orbax's
temporary directory and ignored). A repeated SIGTERM (schedulers resend it) is ignored.

Exit status after a stop: 0 for SIGTERM (a preemption: the run is saved and resumes), 130 for
SIGINT (128 + 2, what a shell reports for Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}
NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}


class StopRequested(Exception):
    """A signal arrived during start-up: the run stopped before training a step."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = EXIT_CODES[signum]


class _State:
    signum: int | None = None
    phase: str = "start-up"
    phase_at_signal: str = "start-up"
    depth: int = 0
    previous: dict[int, object] = {}


_state = _State()


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Installs the stop handlers for SIGTERM and SIGINT (outermost entry resets the flag).

    Off the main thread (a notebook worker) Python cannot install handlers: nothing changes.
    """
    outermost = _state.depth == 0
    if outermost:
        _state.signum, _state.phase, _state.phase_at_signal = None, "start-up", "start-up"
        _state.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                _state.previous[signum] = signal.signal(signum, _handler)
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if outermost:
            for signum, previous in _state.previous.items():
                signal.signal(signum, previous)
            _state.previous = {}


def requested() -> int | None:
    """The signal number that asked the run to stop, or None."""
    return _state.signum


def set_phase(phase: str) -> None:
    """Names what the run is doing now ("step 12", "evaluation at step 10"), for the stop line."""
    _state.phase = phase


def phase_at_signal() -> str:
    return _state.phase_at_signal


def name(signum: int | None) -> str:
    return NAMES.get(signum, f"signal {signum}")


def exit_code(signum: int | None) -> int:
    return EXIT_CODES.get(signum, 0)


def raise_if_requested(workdir: str, start_step: int = 0) -> None:
    """At a start-up safe point: StopRequested if a signal has arrived."""
    signum = _state.signum
    if signum is None:
        return
    where = f"stays at step {start_step}" if start_step else "has no checkpoint yet"
    detail = _state.phase_at_signal.removeprefix("start-up").lstrip(": ")  # "building the model"
    phase = f"start-up ({detail})" if detail else "start-up"
    raise StopRequested(
        signum,
        f"{name(signum)} during {phase}: stopped before training a step; the run in {workdir} "
        f"{where}. Run the same command to continue",
    )


def _handler(signum: int, frame) -> None:
    if _state.signum is None:
        _state.signum, _state.phase_at_signal = signum, _state.phase
        return
    if signum == signal.SIGINT:
        # Written with os.write: a print here could re-enter a print the main thread is inside.
        os.write(2, b"\nsecond Ctrl-C: exiting now without saving\n")
        os._exit(130)
