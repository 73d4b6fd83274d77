"""`python -m training.train RECIPE` (and `accelerate launch -m training.train RECIPE`): the train stage and what it
needs, exactly as `distill train RECIPE` runs it, in every process of a launch."""

import sys

from pipeline.cli import main


def _end_process_group() -> None:
    """Tear the launch's process group down before the interpreter exits: a rank that exits with gloo's threads
    still running can abort ("terminate called without an active exception", SIGABRT) after a finished training."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        code = main(["train", *sys.argv[1:]])
    finally:
        _end_process_group()
    sys.exit(code)
