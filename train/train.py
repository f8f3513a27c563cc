"""Train PixArt-alpha (from scratch or fine-tuning) on a feature cache made by tools/extract_features.py.

    python tools/extract_features.py data/shapes cache/shapes --config shapes_tiny
    python train/train.py --config shapes_tiny
    torchrun --nproc-per-node 2 train/train.py --config shapes_tiny --set train.batch_size=4
    python train/train.py --resume runs/00000-shapes-tiny

The objective is PixArt-alpha's: epsilon MSE plus IDDPM's variational bound for the learned variance, with
captions dropped to the learned null caption at train.class_dropout_prob. Everything else (optimiser, EMA,
mixed precision, DDP, logging, checkpoints, resume) is the shared loop in engine/loop.py.
"""

import sys

from engine.cli import run_trainer
from tasks.alpha import PixArtAlphaTask


def main(argv=None) -> int:
    return run_trainer(PixArtAlphaTask, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
