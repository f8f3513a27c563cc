"""Train a ControlNet branch (PixArt-delta's ControlNet-Transformer, or the ControlNet-UNet baseline) on a frozen
PixArt, from a feature cache extracted with control maps (tools/extract_features.py --control edge|canny).

    python tools/extract_features.py work/shapes/data work/shapes/cache-edge --config shapes_teacher --base-size 32 \
        --control edge
    python train/train_controlnet.py --config controlnet_shapes
    python train/train_controlnet.py --config controlnet_shapes --set control.design=unet --set control.num_blocks=3
    torchrun --nproc-per-node 2 train/train_controlnet.py --config controlnet_shapes --set train.batch_size=32

The task (frozen base, trainable branch) is tasks/controlnet.py; everything else is the shared loop.
"""

import sys

from engine.cli import run_trainer
from tasks.controlnet import ControlNetTask, check_config


def main(argv=None) -> int:
    return run_trainer(ControlNetTask, __doc__, argv, check=check_config)


if __name__ == "__main__":
    sys.exit(main())
