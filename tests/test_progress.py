"""Progress of a long step: a line every PROGRESS_SECONDS or tenth, never a flood from a short one;
on a terminal with text logs, a live bar in their place, removed when the step ends."""
import io
import logging
import sys

import pytest
from rich.console import Console

from common import progress
from common.progress import Progress
from edge import logs as edge_logs


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


# --- The live bar: a `with` block on a terminal with text logs, nowhere else. ---

SHOW_CURSOR = "\x1b[?25h"  # what rich writes when a live display stops


@pytest.fixture
def terminal():
    """A rich console that takes itself for a terminal, writing into a string."""
    return Console(file=io.StringIO(), force_terminal=True, width=120)


def drawn(console) -> str:
    return console.file.getvalue()


def test_on_a_terminal_a_step_draws_a_bar_in_place_of_its_lines(clock, caplog, terminal):
    caplog.set_level(logging.INFO)
    with Progress("frozen layers", 100, "images", logging.getLogger("test.progress"),
                  clock=clock, bar=True, console=terminal) as step:
        advance(step, clock, 50, 1.0)
        assert step.bar is not None
    assert "frozen layers" in drawn(terminal)
    assert "50/100 images (50%), 1.0 images/s, about 50 s left" in drawn(terminal)
    assert lines_of(caplog) == []


def test_off_a_terminal_or_in_json_a_step_logs_its_lines_as_before(clock, caplog, terminal,
                                                                    monkeypatch):
    monkeypatch.setattr(edge_logs, "_live_progress", False)  # as configure leaves it there
    caplog.set_level(logging.INFO)
    with Progress("frozen layers", 100, "images", logging.getLogger("test.progress"),
                  clock=clock, console=terminal) as step:
        advance(step, clock, 100, 1.0)
    lines = lines_of(caplog)
    assert len(lines) == 10
    assert lines[0].getMessage() == ("frozen layers: 10/100 images (10%), 1.0 images/s, "
                                     "about 90 s left")
    assert drawn(terminal) == ""


def test_a_short_step_draws_no_bar(clock, terminal):
    with Progress("decoding", 1000, "images", logging.getLogger("test.progress"), clock=clock,
                  bar=True, console=terminal) as step:
        advance(step, clock, 1000, 0.002)  # 2 s in all
    assert drawn(terminal) == ""


def test_the_bar_is_removed_when_the_step_ends(clock, terminal):
    stderr = sys.stderr
    with Progress("pulling", 10, "objects", logging.getLogger("test.progress"), clock=clock,
                  bar=True, console=terminal) as step:
        advance(step, clock, 10, 1.0)
    assert step.bar is None and sys.stderr is stderr
    assert drawn(terminal).endswith(SHOW_CURSOR + "\r\x1b[1A\x1b[2K")  # cursor back, bar erased


def test_the_bar_is_removed_when_the_step_raises(clock, terminal):
    stderr = sys.stderr
    with pytest.raises(RuntimeError):
        with Progress("pulling", 10, "objects", logging.getLogger("test.progress"), clock=clock,
                      bar=True, console=terminal) as step:
            advance(step, clock, 5, 1.0)
            raise RuntimeError("transfer failed")
    assert step.bar is None and sys.stderr is stderr
    assert drawn(terminal).endswith(SHOW_CURSOR + "\r\x1b[1A\x1b[2K")


def test_a_log_line_written_while_the_bar_is_up_prints_above_it(clock, terminal):
    logger = logging.getLogger("test.progress.above")
    logger.addHandler(edge_logs._StderrHandler())  # the handler edge.logs.configure installs
    logger.propagate = False
    try:
        with Progress("pulling", 10, "objects", logger, clock=clock, bar=True,
                      console=terminal) as step:
            advance(step, clock, 5, 1.0)
            logger.warning("a retry")
    finally:
        logger.handlers.clear()
        logger.propagate = True
    assert "\r\x1b[2Ka retry\n" in drawn(terminal)  # the bar's line cleared, the line, the bar


def test_an_epoch_adds_nothing_where_keras_draws_its_bar_and_lines_elsewhere():
    from job.training.phases import EpochProgress  # TensorFlow: imported by this test only

    callback = EpochProgress("phase 2")
    callback.set_params({"verbose": 1, "epochs": 1, "steps": 50})
    callback.on_epoch_begin(0)
    callback.on_train_batch_end(0)
    assert callback.progress is None
    callback.set_params({"verbose": 0, "epochs": 1, "steps": 50})
    callback.on_epoch_begin(0)
    assert callback.progress.total == 50 and callback.progress.wants_bar is False


def test_calibration_counts_in_a_with_block_that_each_rewind_renews_and_the_end_closes(tmp_path):
    """onnxruntime pulls calibration images and rewinds the reader between passes: every pass
    counts inside the block (so a terminal gets its bar) and nothing is left drawn afterwards,
    also when quantization raises."""
    from export.int8.quantize import ImageReader
    from tests.conftest import write_class_images

    paths = [str(p) for p in sorted(write_class_images(tmp_path, ["a"], 20).rglob("*.png"))]
    reader = ImageReader(paths, 24, batch_size=8)
    with pytest.raises(RuntimeError), reader:
        first = reader.progress
        assert first.in_block and reader.get_next()["image"].shape == (8, 24, 24, 3)
        reader.rewind()
        assert not first.in_block and reader.progress.in_block and reader.progress.done == 0
        raise RuntimeError("quantization failed")
    assert not reader.progress.in_block and reader.progress.bar is None
