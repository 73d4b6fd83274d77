"""The progress bar every stage shows while it works (transient: the stage's summary table replaces it)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)


def stage_progress(console: Console, stage: str, *extra: ProgressColumn | str) -> Progress:
    """A bar labelled '<stage> <task description>', with done/total, any extra columns, and the time elapsed."""
    columns = [TextColumn(f"{stage} {{task.description}}"), BarColumn(), MofNCompleteColumn(), *extra,
               TimeElapsedColumn()]
    return Progress(*columns, console=console, transient=True)
