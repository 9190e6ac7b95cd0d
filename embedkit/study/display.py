"""What the CLI and pipeline runs show while they work: epoch lines and a live elapsed-time line
for steps that report no finer progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console


def epoch_line(log: Any, epochs: int) -> str:
    """``epoch 3/20: train loss 0.4123, val loss 0.3987, lr 1.00e-05 (12.3 s; checkpoint saved)``.

    ``log`` is an :class:`~embedkit.finetune.EpochLog` (``epoch``, ``train_loss``, ``val_loss``
    or None, ``lr``, ``seconds``).
    """
    val = "" if log.val_loss is None else f", val loss {log.val_loss:.4f}"
    return (
        f"epoch {log.epoch}/{epochs}: train loss {log.train_loss:.4f}{val}, lr {log.lr:.2e} "
        f"({log.seconds:.1f} s; checkpoint saved)"
    )


@contextmanager
def working(console: Console, description: str) -> Iterator[None]:
    """A spinner with ``description`` and the elapsed time while the block runs (on a terminal;
    elsewhere one line saying it started), for steps without a finer progress bar."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not console.is_terminal:
        console.print(f"{description} ...", highlight=False)
        yield
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        bar.add_task(description, total=None)
        yield


@contextmanager
def step_bar(
    console: Console, description: str, unit: str = "step"
) -> Iterator[Callable[[int, int], None]]:
    """A bar with count, rate, elapsed and remaining time, driven by ``update(done, total)``
    (e.g. finetuning's optimiser steps over all epochs); nothing on a non-terminal console,
    where the epoch lines are the progress."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not console.is_terminal:
        yield lambda done, total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
