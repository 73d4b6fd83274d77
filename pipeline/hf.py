"""Hugging Face libraries, quietly: stages print their own progress and summaries."""

from __future__ import annotations

import logging
import os


def quiet_hf() -> None:
    """Silence transformers' and datasets' own progress bars and info logs: stages print their own."""
    # bitsandbytes warns on import that an optional CPU kernel package is missing; DeepSpeed that it found no GPU.
    for name in ("bitsandbytes", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # what DeepSpeed falls back to anyway, without its warning
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
