"""The one live progress bar of long jobs (training, scoring, evaluation), on stderr.

    with Progress(enabled=not quiet) as progress:
        task = progress.task("scoring", total=padded_tokens)
        task.advance(cost, tokens=scored, rows="12/40")   # -> "rows 12/40  1,234 tok/s  peak 0.8 GB"
        progress.log("a line above the bar")

Every task shows its description, a bar, the caller's fields in the order given, its
throughput (tokens given to `advance`/`update` per second since the task began), the
peak memory MLX has used, the time elapsed and an ETA. A task's total is the work it
stands for (padded tokens, steps, prompts), so the ETA holds even when the first units
cost more than the last. Disabled (quiet mode, other ranks), nothing is drawn or printed.
"""

from __future__ import annotations

import time
from typing import Any


def peak_memory_gb() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 2**30


class Task:
    """One bar of a `Progress`; see the module docstring."""

    def __init__(self, progress: Progress, task_id: Any, tokens: bool):
        self.progress, self.id, self.with_tokens = progress, task_id, tokens
        self.start = time.perf_counter()
        self.tokens = 0

    def _stats(self, fields: dict[str, Any]) -> str:
        parts = [f"{k} {v}" for k, v in fields.items() if v is not None]
        if self.with_tokens:
            speed = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            parts.append(f"{speed:,.0f} tok/s")
        parts.append(f"peak {peak_memory_gb():.2f} GB")
        return "  ".join(parts)

    def advance(self, amount: float = 0, tokens: int = 0, description: str | None = None,
                **fields: Any) -> None:
        """`amount` more of the total done, `tokens` more tokens processed; show `fields`."""
        self.tokens += tokens
        if self.progress.bar is None:
            return
        extra = {"description": description} if description is not None else {}
        self.progress.bar.update(self.id, advance=amount, stats=self._stats(fields), **extra)

    def update(self, completed: float, tokens: int = 0, description: str | None = None,
               **fields: Any) -> None:
        """`completed` of the total done so far; otherwise as `advance`."""
        self.tokens += tokens
        if self.progress.bar is None:
            return
        extra = {"description": description} if description is not None else {}
        self.progress.bar.update(self.id, completed=completed, stats=self._stats(fields), **extra)


class Progress:
    """A rich progress display holding one or more `Task` bars; silent when not enabled."""

    def __init__(self, enabled: bool = True):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(),
                                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn(),
                                console=Console(stderr=True))

    def task(self, description: str, total: float, completed: float = 0, tokens: bool = True,
             **fields: Any) -> Task:
        """A new bar; `tokens=False` leaves out the tok/s figure."""
        task = Task(self, None, tokens)
        if self.bar is not None:
            task.id = self.bar.add_task(description, total=total, completed=completed,
                                        stats=task._stats(fields))
        return task

    def counter(self, description: str, total: int, noun: str = "done"):
        """A bar over `total` items and its step function `step(new_tokens, finished_items)`."""
        task = self.task(description, total, **{noun: f"0/{total}"})
        done = 0

        def step(new_tokens: int, finished: int) -> None:
            nonlocal done
            done += finished
            task.advance(finished, tokens=new_tokens, **{noun: f"{done}/{total}"})

        return step

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message)

    def start(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def track(items, description: str, enabled: bool = True):
    """Iterate over `items` under one bar (no tok/s figure); plain iteration when not enabled."""
    items = list(items)
    with Progress(enabled=enabled) as progress:
        task = progress.task(description, total=len(items), tokens=False)
        for item in items:
            yield item
            task.advance(1)
