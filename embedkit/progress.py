"""Progress bars for long work (rich), as small context managers the library can accept.

Library functions take an optional ``progress`` factory ``(total, description) -> context manager
yielding advance(n)`` (:data:`ProgressFactory`); the CLI passes :func:`rich_progress`, Python
users may pass nothing (:func:`no_progress`). Where a plug-in interface has no ``progress``
argument, the runner sets one with :func:`progress_scope` and the plug-in reads
:func:`current_progress`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``37.2 img/s``."""

    def __init__(self, unit: str = "img") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(
            "" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed"
        )


@contextmanager
def rich_progress(
    total: int, description: str, *, console: Console | None = None, unit: str = "img"
) -> Iterator[Callable[[int], None]]:
    """A progress bar with count, rate, elapsed and remaining time; yields ``advance(n)``."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int) -> None:
            bar.advance(task, n)

        yield advance


#: ``(total, description) -> context manager yielding advance(n)``: what long library functions
#: accept as ``progress`` (:func:`rich_progress` on the CLI).
ProgressFactory = Callable[[int, str], AbstractContextManager[Callable[[int], None]]]


@contextmanager
def no_progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """The factory used when a caller passes none: shows nothing."""
    yield lambda n: None


_CURRENT: ContextVar[ProgressFactory | None] = ContextVar("embedkit_progress", default=None)


@contextmanager
def progress_scope(factory: ProgressFactory | None) -> Iterator[None]:
    """Make ``factory`` the progress of the work inside the block (a runner sets it around
    plug-ins whose signatures carry no ``progress``, e.g. probe kinds; they read
    :func:`current_progress`)."""
    token = _CURRENT.set(factory)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_progress() -> ProgressFactory:
    """The factory of the innermost :func:`progress_scope`, else :func:`no_progress`."""
    return _CURRENT.get() or no_progress
