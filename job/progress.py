"""Progress: a log line now and then from a long step (pull, frozen layers, epoch, calibration).

A step that runs for minutes or hours must not go silent: a line says how much is done of how
much, the rate and the time left, whenever PROGRESS_SECONDS have passed since the last line, or
another tenth is done (but not more often than every few seconds, so a short step logs nothing
but its end, which its caller reports). The lines are plain log lines, so they read the same on a
terminal, in `kubectl logs` and, as JSON fields, in Cloud Logging.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from edge.logs import fields

PROGRESS_SECONDS = 30.0  # at most this long between two lines of a long step
FRACTION = 0.1  # or a line each tenth of the step ...
MIN_SECONDS = 3.0  # ... but never two lines this close together


class Progress:
    """Counts what a step has done and logs where it stands; advance() after each piece."""

    def __init__(self, step: str, total: int, unit: str, logger: logging.Logger,
                 fraction: float | None = FRACTION, clock: Callable[[], float] = time.monotonic):
        """fraction None: a line every PROGRESS_SECONDS only (for steps that repeat, as epochs
        do, whose short runs need no lines at all)."""
        self.step, self.total, self.unit, self.logger = step, total, unit, logger
        self.fraction, self.clock = fraction, clock
        self.done = 0
        self.started = self.last_line = clock()
        self.last_done = 0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = self.clock()
        since_line = now - self.last_line
        tenth_more = (self.fraction is not None and self.total > 0
                      and self.done - self.last_done >= self.fraction * self.total)
        if since_line >= PROGRESS_SECONDS or (tenth_more and since_line >= MIN_SECONDS):
            self._log(now)

    def _log(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 and self.total else None
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        eta = f", about {_duration(remaining)} left" if remaining is not None else ""
        self.logger.info("%s: %d/%d %s%s, %.1f %s/s%s", self.step, self.done, self.total,
                         self.unit, share, rate, self.unit, eta,
                         extra=fields(step=self.step, done=self.done, total=self.total,
                                      rate_per_second=round(rate, 2),
                                      eta_seconds=round(remaining, 1) if remaining else None))
        self.last_line, self.last_done = now, self.done


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
