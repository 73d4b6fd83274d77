"""`python -m training.train RECIPE` (and `accelerate launch -m training.train RECIPE`): the train stage and what it
needs, exactly as `distill train RECIPE` runs it, in every process of a launch."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
