"""Progress: a log line now and then from a long step (pull, frozen layers, epoch, calibration).

A step that runs for minutes or hours must not go silent: a line says how much is done of how
much, the rate and the time left, whenever PROGRESS_SECONDS have passed since the last line, or
another tenth is done (but not more often than every few seconds, so a short step logs nothing
but its end, which its caller reports). The lines are plain log lines, so they read the same in
`kubectl logs`, in a file and, as JSON fields, in Cloud Logging.

On a terminal with text logs (edge.logs.live_progress, decided once where logging is configured)
a step run as `with Progress(...) as progress:` draws a live bar (rich) with the same figures
instead of those lines, once it has run MIN_SECONDS; the bar is removed when the block ends,
also by an exception, so the caller's end line and every later line print clean. Log lines
written while the bar is up print above it. Outside a `with` block, in json or off a terminal,
a step logs its lines exactly as above.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from edge import logs as edge_logs
from edge.logs import fields

if TYPE_CHECKING:
    import rich.console
    import rich.progress

PROGRESS_SECONDS = 30.0  # at most this long between two lines of a long step
FRACTION = 0.1  # or a line each tenth of the step ...
MIN_SECONDS = 3.0  # ... but never two lines this close together (nor a bar for a shorter step)
REDRAW_SECONDS = 0.1  # the bar is redrawn at most this often


class Progress:
    """Counts what a step has done and shows where it stands; advance() after each piece."""

    def __init__(self, step: str, total: int, unit: str, logger: logging.Logger,
                 fraction: float | None = FRACTION, clock: Callable[[], float] = time.monotonic,
                 *, bar: bool | None = None, console: rich.console.Console | None = None):
        """fraction None: a line every PROGRESS_SECONDS only (for steps that repeat, as epochs
        do, whose short runs need no lines at all). bar: whether a `with` block draws a live bar
        in place of the lines; None, the default, as edge.logs.live_progress() says. console: the
        rich console the bar is drawn on (a terminal's stderr when None)."""
        self.step, self.total, self.unit, self.logger = step, total, unit, logger
        self.fraction, self.clock = fraction, clock
        self.done = 0
        self.started = self.last_line = clock()
        self.last_done = 0
        self.wants_bar = edge_logs.live_progress() if bar is None else bar
        self.console = console
        self.in_block = False  # inside `with`: the only place a bar is drawn, as it is closed there
        self.bar: rich.progress.Progress | None = None  # while one is drawn
        self.last_drawn = 0.0

    def __enter__(self) -> Progress:
        self.in_block = True
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Removes the bar, if one is drawn; lines go on as plain log lines after this."""
        self.in_block = False
        bar, self.bar = self.bar, None
        if bar is not None:
            bar.stop()

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = self.clock()
        if self.in_block and self.wants_bar:
            self._draw(now)
            return
        since_line = now - self.last_line
        tenth_more = (self.fraction is not None and self.total > 0
                      and self.done - self.last_done >= self.fraction * self.total)
        if since_line >= PROGRESS_SECONDS or (tenth_more and since_line >= MIN_SECONDS):
            self._log(now)

    def _figures(self, now: float) -> tuple[float, float | None, str]:
        """The rate, the seconds left (None when unknown) and "done/total unit (share), rate,
        time left" as the lines and the bar show them."""
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 and self.total else None
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        eta = f", about {_duration(remaining)} left" if remaining is not None else ""
        return rate, remaining, (f"{self.done}/{self.total} {self.unit}{share}, "
                                 f"{rate:.1f} {self.unit}/s{eta}")

    def _log(self, now: float) -> None:
        rate, remaining, text = self._figures(now)
        self.logger.info("%s: %s", self.step, text,
                         extra=fields(step=self.step, done=self.done, total=self.total,
                                      rate_per_second=round(rate, 2),
                                      eta_seconds=round(remaining, 1) if remaining else None))
        self.last_line, self.last_done = now, self.done

    def _draw(self, now: float) -> None:
        if self.bar is None:
            if now - self.started < MIN_SECONDS:
                return  # a short step draws nothing
            self.bar = self._open_bar(now)
            if self.bar is None:  # rich finds no terminal there after all: plain lines
                self.wants_bar = False
                return
        elif now - self.last_drawn < REDRAW_SECONDS and self.done < self.total:
            return
        self.bar.update(self.task, completed=self.done, status=self._figures(now)[2])
        self.bar.refresh()
        self.last_drawn = now

    def _open_bar(self, now: float) -> rich.progress.Progress | None:
        import rich.console
        import rich.progress

        console = self.console or rich.console.Console(stderr=True)
        if not console.is_terminal:
            return None
        # Redrawn from advance() only (no refresh thread); transient: gone once stopped. stdout
        # is not redirected: it is not the log stream (bench prints its JSON there).
        bar = rich.progress.Progress(
            rich.progress.TextColumn("{task.description}"), rich.progress.BarColumn(),
            rich.progress.TextColumn("{task.fields[status]}"),
            console=console, auto_refresh=False, transient=True, redirect_stdout=False,
            redirect_stderr=True)
        self.task = bar.add_task(self.step, total=self.total or None, completed=self.done,
                                 status=self._figures(now)[2])
        bar.start()
        return bar


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
