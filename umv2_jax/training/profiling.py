"""`--profile START:STOP`: a `jax.profiler` trace of training steps START … STOP (inclusive).

    profiler = StepProfiler(steps=(10, 15), directory="RUN/profile", start_step=0, echo=print)
    profiler.before_step(11)          # starts the trace before step START is dispatched
    profiler.after_step(11, wait)     # after step STOP: waits for it, stops the trace
    profiler.close()                  # stops a trace still open (the run ended or failed first)

The trace goes to DIRECTORY/plugins/profile/<timestamp>/: `*.xplane.pb` (TensorBoard's profile
plugin: `tensorboard --logdir RUN/profile`; or XProf) and `perfetto_trace.json.gz` (drop it on
ui.perfetto.dev). Step time in metrics.jsonl is measured as usual during the trace (tracing
slows host-side dispatch a little). A resumed run traces the part of the range it still has to run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax


class StepProfiler:
    def __init__(
        self,
        steps: tuple[int, int] | None,
        directory: str,
        start_step: int,
        echo: Callable[[str], None],
    ):
        """`steps`: (START, STOP) from `TrainConfig.profile_steps()` (already checked against
        1 … train.steps), None: no trace. `start_step`: the step the run resumes from."""
        self.directory = directory
        self._echo = echo
        self._active = False
        self._range = None
        if steps is None:
            return
        first, last = steps
        if last <= start_step:
            echo(
                f"note: train.profile {first}:{last} lies before the resumed step {start_step}; "
                "no trace this run"
            )
            return
        self._range = (max(first, start_step + 1), last)

    @property
    def active(self) -> bool:
        return self._active

    def before_step(self, step: int) -> None:
        """Call before dispatching `step` (1-based)."""
        if self._range is not None and step == self._range[0] and not self._active:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self._active = True

    def after_step(self, step: int, wait: Callable[[], None]) -> None:
        """Call after dispatching `step`; `wait()` blocks until its results exist."""
        if self._active and step >= self._range[1]:
            wait()  # the trace holds the device work of step STOP, not only its dispatch
            self._stop()
            first, last = self._range
            self._echo(
                f"step {step}: profiled steps {first}…{last} into {self.directory} "
                f"(tensorboard --logdir {self.directory}, or perfetto_trace.json.gz on "
                "ui.perfetto.dev)"
            )

    def close(self) -> None:
        """Stops a trace that is still running (the run stopped inside the range)."""
        if self._active:
            self._stop()

    def _stop(self) -> None:
        self._active = False
        jax.profiler.stop_trace()
