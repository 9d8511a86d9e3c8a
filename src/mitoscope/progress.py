"""How the command line shows the library's progress: bars on a terminal, plain lines elsewhere.

The library reports progress as ``progress(stage, done, total)`` calls (``done`` = 0 when a
stage starts, ``done`` = ``total`` when it ends). On a terminal these become rich bars (or tqdm
bars for ``finetune``, whose Lightning bar is a tqdm bar too). When stderr is a file, a pipe,
a scheduler's log, bars would write nothing useful (rich) or one endless carriage-return line
(tqdm), so :class:`TextLines` writes plain lines instead: one when a stage starts, then at most
one every ``interval`` seconds, and the last one, each with the stage, done/total, the elapsed
time and an estimate of the time left.

Nothing here imports PyTorch or Lightning at import time: the CLI loads this module first.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TextIO

__all__ = ["DEFAULT_INTERVAL", "Progress", "StageBars", "TextLines", "format_duration", "lightning_display",
           "lightning_progress", "progress_display", "rich_bars"]

# (stage description, done, total), as every progress callback of the package is called.
Progress = Callable[[str, int, int], None]

# Seconds between two lines of the same stage in plain-text mode.
DEFAULT_INTERVAL = 5.0


def format_duration(seconds: float) -> str:
    """``m:ss`` under an hour, ``h:mm:ss`` from there (as rich's bars show time)."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class _Stage:
    started: float  # clock time of the stage's first call
    done_at_start: int  # work already done then (e.g. images found in the cache): not part of the rate
    last_line: float
    last_done: int
    finished: bool = False


class TextLines:
    """Progress as plain lines on ``stream``: ``STAGE: DONE/TOTAL (P%) elapsed M:SS eta M:SS``.

    A stage gets a line on its first call, then at most one every ``interval`` seconds, and
    one when it finishes (``done >= total``), which gives its total time instead of an
    estimate. The estimate is the rate since the stage's first call times the work left (work
    done before the first call, e.g. cached images, does not count towards the rate). A
    finished stage that is called again from below its total (the same stage name for another
    set of images) starts over. ``clock`` is injectable for tests.
    """

    def __init__(self, stream: TextIO, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.interval = float(interval)
        self.clock = clock
        self.stages: dict[str, _Stage] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        finished = done >= total
        state = self.stages.get(stage)
        if state is None or done < state.last_done or (state.finished and not finished):
            state = self.stages[stage] = _Stage(started=now, done_at_start=done, last_line=now, last_done=done)
        elif state.finished or not (finished or now - state.last_line >= self.interval):
            state.last_done = done
            return  # said already, or too soon
        state.last_line, state.last_done, state.finished = now, done, finished
        self._write(stage, done, total, state, now, finished)

    def _write(self, stage: str, done: int, total: int, state: _Stage, now: float, finished: bool) -> None:
        elapsed = now - state.started
        percent = f" ({100 * done / total:.0f}%)" if total > 0 else ""
        line = f"{stage}: {done}/{total}{percent} elapsed {format_duration(elapsed)}"
        if not finished:
            progressed = done - state.done_at_start
            eta = format_duration(elapsed / progressed * (total - done)) if progressed > 0 else "?"
            line += f" eta {eta}"
        self.stream.write(line + "\n")
        self.stream.flush()


@contextmanager
def rich_bars(console: Any) -> Iterator[Progress]:
    """Rich progress bars on ``console``, one per stage; yields the progress callback."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Bars(TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
              TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False) as bars:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


@contextmanager
def progress_display(console: Any, interval: float = DEFAULT_INTERVAL) -> Iterator[Progress]:
    """The progress callback for ``console`` (a rich Console): bars on a terminal, plain lines otherwise."""
    if console.is_terminal:
        with rich_bars(console) as update:
            yield update
    else:
        yield TextLines(console.file, interval)


@contextmanager
def lightning_display(console: Any, interval: float = DEFAULT_INTERVAL) -> Iterator[Progress]:
    """As :func:`progress_display`, for commands that run Lightning (whose bars are tqdm bars):
    tqdm bars on a terminal, plain lines otherwise (add :func:`lightning_progress` then)."""
    if console.is_terminal:
        bars = StageBars()
        try:
            yield bars
        finally:
            bars.close()
    else:
        yield TextLines(console.file, interval)


class StageBars:
    """The library's progress as tqdm bars (Lightning draws tqdm bars too)."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if stage not in self.bars:
            self.bars[stage] = tqdm(total=total, desc=stage, unit="image" if "fold" not in stage else "fold",
                                    leave=True, dynamic_ncols=True)
        bar = self.bars[stage]
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def lightning_progress(progress: Progress) -> Any:
    """A Lightning callback that reports, on the main process only, training epochs (stage
    "``STAGE PHASE`` epochs" from a fine-tuning module's ``tag``) and prediction steps (stage
    "extracting") to ``progress``: what plain-text logs get instead of Lightning's tqdm bar."""
    from lightning.pytorch.callbacks import Callback

    def epochs(trainer: Any, module: Any, done: int) -> None:
        if trainer.is_global_zero:
            tag = getattr(module, "tag", None) or {}
            label = " ".join(str(tag[key]) for key in ("stage", "phase") if tag.get(key))
            progress(f"{label} epochs".strip(), done, int(trainer.max_epochs))

    def steps(trainer: Any, done: int, dataloader_idx: int) -> None:
        if trainer.is_global_zero:
            progress("extracting", done, int(trainer.num_predict_batches[dataloader_idx]))

    class StageProgress(Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            epochs(trainer, module, 0)  # the clock of the estimate starts here

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            epochs(trainer, module, trainer.current_epoch + 1)

        def on_predict_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int,
                                   dataloader_idx: int = 0) -> None:
            if batch_idx == 0:
                steps(trainer, 0, dataloader_idx)

        def on_predict_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int,
                                 dataloader_idx: int = 0) -> None:
            steps(trainer, batch_idx + 1, dataloader_idx)

    return StageProgress()
