"""Following the validation figure: early stopping, and ``train.lr_scheduler: plateau`` — a learning rate that is
constant after warm-up and multiplied by ``train.plateau.factor`` each time ``train.plateau.patience`` evaluations
in a row bring no better ``select_by`` figure (torch's ReduceLROnPlateau, after a warm-up and on the task metric).
A run keeps its full rate for as long as it still learns. On the demo it did worse than a cosine decay (three of six
runs stalled: docs/train.md), so the demo does not use it.

How many times the rate was cut, and how many evaluations went by without a better figure, are worked out from the
Trainer's log history at every evaluation, not kept in a callback, so a resumed run goes on with the rate and the
count it stopped at (transformers' EarlyStoppingCallback starts counting again). Both use one rule, ``improved``:
better than the best so far by more than ``train.early_stopping_threshold``; with ``select_by: quality`` a tie in
quality with a lower validation loss is not better. While quality is still 0 everywhere nothing is better, so a
student that has not yet got one answer right gets its rate cut (and is stopped) by the patience counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

# selection_value breaks quality ties by 1e-9 x the validation loss (capped at 99): less than this, so never
# counted as an improvement; any real change of quality (rounded to 6 digits) is larger.
TIE_SPAN = 1e-7


def improvement_threshold(cfg) -> float:
    """Smallest change of the select_by figure that counts as better (early stopping and the plateau rule)."""
    if cfg.select_by == "quality":
        return max(cfg.early_stopping_threshold, TIE_SPAN)
    return cfg.early_stopping_threshold


def improved(value: float, best: float | None, greater_is_better: bool, threshold: float) -> bool:
    """Whether ``value`` beats ``best`` by more than ``threshold``."""
    if best is None:
        return True
    return value - best > threshold if greater_is_better else best - value > threshold


def streaks(values: Iterable[float], greater_is_better: bool, threshold: float) -> list[int]:
    """For each evaluation, how many in a row up to it brought no improvement (0: it improved)."""
    best, run, out = None, 0, []
    for v in values:
        if improved(v, best, greater_is_better, threshold):
            best, run = v, 0
        else:
            run += 1
        out.append(run)
    return out


def reductions(values: Iterable[float], greater_is_better: bool, threshold: float, patience: int) -> int:
    """How many times the rate is cut over this series of evaluations: once per ``patience`` evaluations in a row
    without an improvement (the count restarts after each cut and after each improvement)."""
    return sum(1 for run in streaks(values, greater_is_better, threshold) if run and run % patience == 0)


def since_improvement(values: Iterable[float], greater_is_better: bool, threshold: float) -> int:
    """Evaluations since the last one that improved on the best so far (0: the last one did)."""
    runs = streaks(values, greater_is_better, threshold)
    return runs[-1] if runs else 0


def early_stop_callback(cfg, key: str, greater_is_better: bool):
    """Stops training once ``train.early_stopping_patience`` evaluations in a row bring no better ``key``."""
    from transformers import TrainerCallback

    threshold = improvement_threshold(cfg)

    class EarlyStop(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            values = [row[key] for row in state.log_history if key in row]
            if since_improvement(values, greater_is_better, threshold) >= cfg.early_stopping_patience:
                control.should_training_stop = True

    return EarlyStop()


def plateau_callback(cfg, key: str, greater_is_better: bool, say: Callable[[str], None] = lambda _: None):
    """The Trainer callback that scales the warm-up schedule's base rates after every evaluation. ``key``: the
    logged figure (eval_select or eval_loss)."""
    from transformers import TrainerCallback

    threshold = improvement_threshold(cfg)

    class Plateau(TrainerCallback):
        def __init__(self):
            self.cuts = 0

        def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            from torch.optim.lr_scheduler import LambdaLR

            if not isinstance(getattr(lr_scheduler, "scheduler", lr_scheduler), LambdaLR):
                raise ValueError(f"train.lr_scheduler: plateau scales the Trainer's own warm-up schedule, but the "
                                 f"DeepSpeed config (train.deepspeed: {cfg.deepspeed}) brings its own 'scheduler': "
                                 "remove that section, or choose another lr_scheduler")

        def on_evaluate(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
            values = [row[key] for row in state.log_history if key in row]
            cuts = reductions(values, greater_is_better, threshold, cfg.plateau.patience)
            sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
            groups = optimizer.param_groups
            scale = cfg.plateau.factor ** cuts
            sched.base_lrs = [g["initial_lr"] * scale for g in groups]
            for g, base, f in zip(groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                g["lr"] = base * f(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in groups]  # what the Trainer logs as the next step's learning_rate
            if cuts > self.cuts and state.is_world_process_zero:
                n = cfg.plateau.patience
                say(f"no better validation {cfg.select_by} for {n} evaluation{'s' * (n > 1)}: learning rate "
                    f"now {args.learning_rate * scale:.3g} (cut {cuts}x)")
            self.cuts = cuts

    return Plateau()
