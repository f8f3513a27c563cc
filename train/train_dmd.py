"""Distil a PixArt-alpha teacher into a one-step (or few-step) generator by distribution matching (DMD2) on a feature
cache made by tools/extract_features.py (its captions; its images only for the optional GAN term).

    python train/train_dmd.py --config dmd_shapes                         # the shapes teacher, one step
    python train/train_dmd.py --config dmd_shapes --set dmd.generator_steps=2
    python train/train_dmd.py --config dmd_shapes --set dmd.fake_updates=1 --set dmd.gan_weight=1e-3
    python train/train_dmd.py --config dmd_512 --set dmd.teacher=weights/PixArt-XL-2-512x512.pth
    python sample/sample.py --config dmd_shapes --prompt "a small green triangle at the top right"

The task (generator, fake score, frozen teacher) is tasks/dmd.py, the objectives diffusion/dmd.py; everything else
is the shared loop.
"""

import sys

from engine.cli import run_trainer
from tasks.dmd import DMDTask, check_config


def main(argv=None) -> int:
    return run_trainer(DMDTask, __doc__, argv, check=check_config)


if __name__ == "__main__":
    sys.exit(main())
