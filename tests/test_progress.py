"""Progress of a long step: a line every PROGRESS_SECONDS or tenth, never a flood from a short one."""
import logging

import pytest

from job import progress
from job.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def lines_of(caplog):
    return [record for record in caplog.records if record.name == "test.progress"]


def advance(step: Progress, clock: Clock, pieces: int, seconds_each: float) -> None:
    for _ in range(pieces):
        clock.now += seconds_each
        step.advance()


def test_a_slow_step_logs_each_tenth_with_rate_and_time_left(clock, caplog):
    caplog.set_level(logging.INFO)
    step = Progress("frozen layers", 100, "images", logging.getLogger("test.progress"), clock=clock)
    advance(step, clock, 100, 1.0)  # 100 s in all
    lines = lines_of(caplog)
    assert len(lines) == 10
    assert lines[0].getMessage() == ("frozen layers: 10/100 images (10%), 1.0 images/s, "
                                     "about 90 s left")
    assert lines[0].fields == {"step": "frozen layers", "done": 10, "total": 100,
                               "rate_per_second": 1.0, "eta_seconds": 90.0}


def test_a_short_step_logs_nothing(clock, caplog):
    caplog.set_level(logging.INFO)
    step = Progress("decoding", 1000, "images", logging.getLogger("test.progress"), clock=clock)
    advance(step, clock, 1000, 0.002)  # 2 s in all: its end is the caller's line
    assert lines_of(caplog) == []


def test_a_very_long_step_is_never_silent_for_longer_than_progress_seconds(clock, caplog):
    caplog.set_level(logging.INFO)
    step = Progress("downloading", 1_000_000, "objects", logging.getLogger("test.progress"),
                    clock=clock)
    advance(step, clock, 10_000, 0.05)  # 500 s, 1 % done
    times = [0.0] + [record.fields["done"] * 0.05 for record in lines_of(caplog)]
    assert max(b - a for a, b in zip(times, times[1:])) <= progress.PROGRESS_SECONDS + 0.1
    assert "about 13.8 h left" in lines_of(caplog)[-1].getMessage()


def test_an_epoch_logs_on_time_alone(clock, caplog):
    caplog.set_level(logging.INFO)
    epoch = Progress("phase 2 epoch 1", 50, "batches", logging.getLogger("test.progress"),
                     fraction=None, clock=clock)
    advance(epoch, clock, 50, 1.0)  # 50 s: one line at 30 s, none per tenth
    assert [record.fields["done"] for record in lines_of(caplog)] == [30]
