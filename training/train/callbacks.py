"""The train stage's Trainer callbacks: every logged metric into metrics.jsonl, and a progress bar with the losses.

TRL's RichProgressCallback opens its own Console and draws a Live panel; this one draws the stages' usual bar.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.ui import stage_progress


def metrics_callback(path: Path):
    from transformers import TrainerCallback

    class MetricsToJsonl(TrainerCallback):
        """Appends every logged metric dict to metrics.jsonl (main process only)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "time": time.time(), **logs}
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")

    return MetricsToJsonl()


def progress_callback(console):
    """A rich progress bar over optimizer steps showing the latest train and validation loss."""
    from rich.progress import (
        TextColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def __init__(self):
            self.progress = None
            self.task = None
            self.loss = self.eval_loss = "-"

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.progress = stage_progress(console, "train", TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"),
                                               TimeRemainingColumn())
                self.progress.start()
                self.task = self.progress.add_task("", total=state.max_steps, completed=state.global_step,
                                                   loss="-", val="-")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress and logs:
                if "loss" in logs:
                    self.loss = f"{float(logs['loss']):.4f}"
                if "eval_loss" in logs:
                    self.eval_loss = f"{float(logs['eval_loss']):.4f}"
                self.progress.update(self.task, loss=self.loss, val=self.eval_loss)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress:
                self.progress.stop()
                self.progress = None

    return RichProgress()
