"""Progress for the command line: plain lines when stderr is not a terminal, bars when it is."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from blobs import write_blobs
from mitoscope.cli import app
from mitoscope.progress import TextLines, format_duration, lightning_progress, progress_display


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (4.4, "0:04"), (65, "1:05"), (3599.6, "1:00:00"),
                                           (3725, "1:02:05"), (-3, "0:00")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_text_lines_say_the_start_then_at_most_every_interval_then_the_end():
    stream, clock = io.StringIO(), FakeClock()
    show = TextLines(stream, interval=5.0, clock=clock)
    show("features", 20, 120)  # 20 images were cached: they do not count towards the rate
    for second in range(1, 26):
        clock.now += 1.0
        show("features", 20 + 4 * second, 120)  # 4 images a second
    assert lines_of(stream) == [
        "features: 20/120 (17%) elapsed 0:00 eta ?",
        "features: 40/120 (33%) elapsed 0:05 eta 0:20",
        "features: 60/120 (50%) elapsed 0:10 eta 0:15",
        "features: 80/120 (67%) elapsed 0:15 eta 0:10",
        "features: 100/120 (83%) elapsed 0:20 eta 0:05",
        "features: 120/120 (100%) elapsed 0:25",  # the last one, 0 s after the previous line: always said
    ]


def test_text_lines_keep_stages_apart_and_say_the_end_once():
    stream, clock = io.StringIO(), FakeClock()
    show = TextLines(stream, interval=5.0, clock=clock)
    show("cross-validation", 0, 3)
    clock.now += 1.0
    show("cross-validation", 1, 3)  # too soon: not said
    show("final fit", 0, 1)  # another stage: said at once
    clock.now += 1.0
    show("cross-validation", 3, 3)
    show("cross-validation", 3, 3)  # the end again: said once
    show("final fit", 1, 1)
    assert lines_of(stream) == [
        "cross-validation: 0/3 (0%) elapsed 0:00 eta ?",
        "final fit: 0/1 (0%) elapsed 0:00 eta ?",
        "cross-validation: 3/3 (100%) elapsed 0:02",
        "final fit: 1/1 (100%) elapsed 0:01",
    ]


def test_a_stage_name_used_again_for_other_images_starts_over():
    stream, clock = io.StringIO(), FakeClock()
    show = TextLines(stream, interval=5.0, clock=clock)
    show("features", 0, 2)
    clock.now += 10.0
    show("features", 2, 2)
    clock.now += 1.0
    show("features", 0, 4)  # e.g. evaluate after train in `mitoscope demo`
    clock.now += 3.0
    show("features", 4, 4)
    assert lines_of(stream) == [
        "features: 0/2 (0%) elapsed 0:00 eta ?",
        "features: 2/2 (100%) elapsed 0:10",
        "features: 0/4 (0%) elapsed 0:00 eta ?",
        "features: 4/4 (100%) elapsed 0:03",
    ]


def test_the_display_is_plain_lines_off_a_terminal_and_bars_on_one():
    plain = Console(file=io.StringIO(), force_terminal=False)
    with progress_display(plain) as show:
        assert isinstance(show, TextLines)
        show("features", 1, 1)
    assert plain.file.getvalue() == "features: 1/1 (100%) elapsed 0:00\n"
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    with progress_display(terminal) as show:
        assert not isinstance(show, TextLines)
        show("features", 1, 2)
    assert "features" in terminal.file.getvalue() and "\x1b[" in terminal.file.getvalue()  # drawn by rich


def test_lightning_progress_reports_epochs_and_prediction_steps_on_the_main_process_only():
    calls = []
    callback = lightning_progress(lambda *args: calls.append(args))
    module = SimpleNamespace(tag={"stage": "fold 1", "phase": "head"})
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=2, max_epochs=5, num_predict_batches=[7])
    callback.on_train_start(trainer, module)
    callback.on_train_epoch_end(trainer, module)
    for step in range(2):
        callback.on_predict_batch_start(trainer, SimpleNamespace(), None, step)
        callback.on_predict_batch_end(trainer, SimpleNamespace(), None, None, step)
    callback.on_train_epoch_end(SimpleNamespace(**{**vars(trainer), "is_global_zero": False}), module)
    assert calls == [("fold 1 head epochs", 0, 5), ("fold 1 head epochs", 3, 5), ("extracting", 0, 7),
                     ("extracting", 1, 7), ("extracting", 2, 7)]


@pytest.mark.slow
def test_train_writes_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    data = tmp_path / "data"
    write_blobs(data, 4)
    result = CliRunner().invoke(app, [str(a) for a in (
        "train", data, "--labels", data / "labels.csv", "--out", tmp_path / "model", "--backbone",
        "test_efficientnet", "--random-init", "--window", "64", "--head", "pooled", "--cv", 2,
        "--cache-dir", tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "features: 0/8 (0%) elapsed 0:00 eta ?" in lines
    for stage, total in (("features", 8), ("cross-validation", 2), ("final fit", 1)):
        assert any(line.startswith(f"{stage}: {total}/{total} (100%) elapsed ") for line in lines), lines
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr  # no bars, no colour codes
