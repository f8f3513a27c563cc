"""Distil a PixArt-alpha teacher into a PixArt-delta student that makes images in 1-4 LCM steps (latent consistency
distillation, PixArt-delta Algorithm 1) on a feature cache made by tools/extract_features.py.

    python train/train_lcm.py --config lcm_shapes                       # the shipped shapes student
    python train/train_lcm.py --config lcm_shapes --set distill.guidance=3.5
    python train/train_lcm.py --config lcm_shapes --set distill.lora_rank=32          # LCM-LoRA
    python train/train_lcm.py --config lcm_1024 --set distill.teacher=weights/PixArt-XL-2-1024-MS
    torchrun --nproc-per-node 2 train/train_lcm.py --config lcm_shapes --set train.batch_size=32

The task (student, EMA target, frozen teacher) is tasks/lcd.py; everything else is the shared loop.
"""

import sys

from engine.cli import run_trainer
from tasks.lcd import LCMTask, check_config


def main(argv=None) -> int:
    return run_trainer(LCMTask, __doc__, argv, check=check_config)


if __name__ == "__main__":
    sys.exit(main())
