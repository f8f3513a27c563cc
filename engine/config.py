"""The `train:` and `data:` sections of a run config."""

from dataclasses import dataclass
from typing import Literal

from common.choices import check_choices
from common.errors import UserError

DType = Literal["fp32", "bf16", "fp16"]
LRSchedule = Literal["constant", "cosine"]
Precision = Literal["no", "bf16", "fp16"]
Strategy = Literal["ddp", "fsdp"]


@dataclass
class TrainConfig:
    """How to optimise; the `train:` section of a run config."""

    name: str = "pixart"                  # run folders are runs_dir/NNNNN-name
    runs_dir: str = "runs"
    init_from: str | None = None          # weights to start from (any checkpoint format); None: from scratch
    steps: int = 1000                     # optimiser steps
    batch_size: int = 8                   # samples per process per micro-batch
    grad_accumulation: int = 1            # micro-batches per optimiser step
    lr: float = 2e-5
    weight_decay: float = 0.03
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 1000              # linear warm-up of the learning rate from 0
    lr_schedule: LRSchedule = "constant"  # after warm-up: constant | cosine (to 0 at the last step)
    grad_clip: float = 0.01               # max global gradient norm; <= 0: no clipping (the norm is still logged)
    ema_decay: float = 0.9999             # EMA of the weights (exported and sampled); 0: no EMA
    mixed_precision: Precision = "no"     # no | bf16 (autocast, CPU and GPU) | fp16 (autocast + grad scaler, GPU)
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    frozen_dtype: DType = "fp32"          # fp32 | bf16 | fp16: how frozen networks (an LCD teacher, a ControlNet's
                                          # base, LoRA's base weights) are stored; under autocast their matmuls run
                                          # in the autocast dtype anyway, so bf16 halves their memory for free
    compile: bool = False                 # torch.compile the model's forward and backward (eager fallback, warned)
    distributed: Strategy = "ddp"         # ddp | fsdp (blocks' parameters, gradients, optimiser state sharded)
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda
    log_every: int = 10
    sample_every: int = 500               # sample grid every N steps (0: never)
    checkpoint_every: int = 500           # full training state every N steps, and at the end
    keep_checkpoints: int = 3
    class_dropout_prob: float = 0.1       # captions replaced by the null caption (CFG training)
    min_snr_gamma: float = 0.0            # > 0: Min-SNR-gamma weighting of the diffusion MSE (5 is usual); 0: off
    timestep_power: float = 1.0           # training timesteps floor(T u^p), u ~ U[0, 1): 1 uniform (PixArt); 2 puts
                                          # 71% of the steps below T/2 (the low-noise steps where outlines form)
    timestep_logit_normal: tuple[float, float] | None = None  # [mean, std]: timesteps floor(T sigmoid(mean + std n)),
                                          # n ~ N(0, 1); [-0.2, 0.8] puts 72% of the steps in 250..650 (where the
                                          # shapes teacher decides an object's kind); null: off
    loss_edge_weight: float = 0.0         # pixel space: pixels on an edge of the clean image (3x3 neighbourhood
                                          # spanning > 0.5 in some channel) weigh 1 + this in the MSE, normalised to
                                          # mean 1 per image; 4 lets the shapes teacher learn an object's kind; 0: off

    def validate(self) -> None:
        check_choices(self, "train")
        for name in ("steps", "batch_size", "grad_accumulation"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"train.ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")


@dataclass
class DataConfig:
    """Where training reads from; the `data:` section of a run config."""

    cache_dir: str = "cache/features"     # made by tools/extract_features.py
    num_workers: int = 0                  # DataLoader worker processes
    sample_captions: int = 8              # captions of the first cached samples drawn in sample grids
