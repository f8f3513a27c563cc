"""The training loop shared by every trainer. A trainer is a Task: its model, its trainable parameters and its loss.

    python train/train.py --config CONFIG                      # one process
    torchrun --nproc-per-node 2 train/train.py --config CONFIG  # DDP (gloo on CPU, nccl on GPU)
    python train/train.py --resume runs/00003-pixart           # continue exactly where it stopped

The loop owns everything else: AdamW with linear warm-up, gradient accumulation and clipping, EMA, mixed
precision, DDP, numbered run folders, logs (stdout, log.txt, TensorBoard), sample grids, atomic checkpoints with
the full training state, exact resume, NaN/inf detection and Ctrl-C / SIGTERM handling.
"""

import contextlib
import signal
import time
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from configs import save_config, to_dict, to_yaml
from engine import distributed
from engine.ema import EMA
from engine.monitor import Monitor, log, peak_memory_mb, setup_logging
from engine.randomness import SampleRandomness, rng_state, seed_everything, set_rng_state
from engine.state import (
    ResumeError,
    config_differences,
    latest_checkpoint,
    load_state,
    new_run_dir,
    resolve_resume,
    save_state,
)


class Task(Protocol):
    """What a trainer supplies; everything else is the loop's."""

    model: nn.Module  # holds the trainable parameters; DDP wraps it, the EMA copies it

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def loss(self, model: nn.Module, batch: dict, rng: SampleRandomness) -> tuple[torch.Tensor, dict]:
        """Scalar loss of one micro-batch (mean over its samples) and per-term scalars to log."""

    def sample(self, model: nn.Module, batch: dict, step: int) -> torch.Tensor | None:
        """Images (N, 3, H, W) in [0, 1] for the sample grid (batch: cached samples for their captions)."""

    def export(self, state_dict: dict, path: Path, metadata: dict) -> None:
        """Write weights (the EMA's when there is an EMA) for sampling, e.g. as this project's safetensors."""


class TrainingError(RuntimeError):
    """Training stopped on a problem (NaN loss, ...); the message names the step and the last good checkpoint."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving a resumable checkpoint."""

    def __init__(self, signum: int, run_dir: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; continue with --resume {run_dir}")
        self.signum = signum


class StopRequest:
    """Ctrl-C and SIGTERM set a flag; the loop saves a resumable checkpoint at the end of the step and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s received: saving a checkpoint at the end of this step (again to abort)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _warmup(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _autocast(mode: str, device: torch.device):
    if mode == "no":
        return contextlib.nullcontext()
    if mode not in ("bf16", "fp16"):
        raise ValueError(f"train.mixed_precision must be no, bf16 or fp16, got {mode!r}")
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("train.mixed_precision=fp16 needs a GPU (its gradient scaler); use bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def feature_data(cfg):
    """The feature cache of cfg.data.cache_dir and its bucketed batch sampler."""
    from data.buckets import BucketBatchSampler
    from data.features import FeatureDataset, collate

    return FeatureDataset(cfg.data.cache_dir), collate, BucketBatchSampler


def train(cfg, make_task, dataset_factory=feature_data, resume: str | None = None) -> Path:
    """Run (or resume) training of the task `make_task(cfg, device)`; returns the run folder.

    dataset_factory(cfg) returns (dataset with .buckets, collate function, batch-sampler class); tests inject
    in-memory data through it.
    """
    d = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, make_task, dataset_factory, resume, d)
    finally:
        distributed.teardown()


def _prepare_run(cfg, resume, d) -> tuple[Path, dict | None]:
    """The run folder (new, or the resumed one) and the state to resume from."""
    state = None
    if resume:
        run_dir, ckpt = resolve_resume(resume)
        state = load_state(ckpt, torch.device("cpu"))
        differences = config_differences(state["config"]["model"], to_dict(cfg)["model"], "model.")
        if differences:
            raise ResumeError(f"cannot resume {ckpt}: the model config differs from the checkpoint's:\n  "
                              + "\n  ".join(differences) + "\nresume with the run's own config.yaml, or start a "
                              "new run with train.init_from to fine-tune from those weights")
        return run_dir, state
    names = [str(new_run_dir(cfg.train.runs_dir, cfg.train.name)) if d.is_main else None]
    if d.enabled:
        torch.distributed.broadcast_object_list(names, src=0)
    return Path(names[0]), None


def _train(cfg, make_task, dataset_factory, resume, d) -> Path:
    tc = cfg.train
    run_dir, state = _prepare_run(cfg, resume, d)
    setup_logging(run_dir, d.is_main)
    if d.is_main:
        save_config(cfg, run_dir / "config.yaml")
        log.info("run %s (%s), %d process(es) on %s\n%s", run_dir, "resumed" if state else "new", d.world_size,
                 d.device, to_yaml(cfg))
    autocast = _autocast(tc.mixed_precision, d.device)
    seed_everything(tc.seed)  # the same initial weights on every rank (FSDP does not broadcast them)
    task = make_task(cfg, d.device)
    seed_everything(tc.seed + d.rank)
    model = task.model
    if tc.gradient_checkpointing:
        for module in model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
    fsdp = distributed.uses_fsdp(tc.distributed, d)
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    dmodel = distributed.wrap(model, d, tc.distributed)
    if fsdp and ema is not None:
        distributed.shard(ema.model)  # sharded like the model: the EMA update stays local to each shard
    params = task.trainable_parameters()  # after sharding, which replaces the parameters by sharded ones
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps,
                                  weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(tc.warmup_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=tc.mixed_precision == "fp16")

    dataset, collate, sampler_cls = dataset_factory(cfg)
    sampler = sampler_cls(dataset.buckets, tc.batch_size, tc.seed, d.rank, d.world_size)
    step, consumed = 0, 0
    if state is not None:
        distributed.load_model_state(model, state["model"], fsdp)
        distributed.load_optimizer_state(model, optimizer, state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            distributed.load_model_state(ema.model, state["ema"], fsdp)
            ema.updates = state["ema_updates"]
        step, consumed = state["step"], state["batches_consumed"]
        set_rng_state(state["rng"])
        log.info("resumed from step %d (%d batches consumed)", step, consumed)
    sampler.load_state_dict(sampler.state_at(consumed))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.num_workers, pin_memory=d.device.type == "cuda")
    batches = iter(loader)
    preview = collate([dataset[i] for i in range(min(cfg.data.sample_captions, len(dataset)))])

    monitor = Monitor(run_dir, d.is_main)
    last_good = latest_checkpoint(run_dir)

    def checkpoint(at_step: int) -> Path | None:
        nonlocal last_good
        distributed.barrier(d)
        # Gathering full state dicts is collective under FSDP: every rank takes part, rank 0 writes.
        weights = distributed.model_state(model, fsdp)
        ema_weights = distributed.model_state(ema.model, fsdp) if ema else None
        optim = distributed.optimizer_state(model, optimizer, fsdp)
        if d.is_main:
            last_good = save_state(run_dir, at_step, dict(
                model=weights, ema=ema_weights, ema_updates=ema.updates if ema else 0, optimizer=optim,
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), batches_consumed=consumed,
                rng=rng_state(), config=to_dict(cfg)), tc.keep_checkpoints)
            task.export(ema_weights if ema else weights, run_dir / ("ema.safetensors" if ema else
                        "weights.safetensors"), {"step": str(at_step), "config": to_yaml(cfg)})
            log.info("checkpoint %s", last_good)
        distributed.barrier(d)
        return last_good

    window = {"loss": 0.0, "time": time.perf_counter(), "steps": 0, "terms": {}}
    per_step = tc.batch_size * d.world_size * tc.grad_accumulation
    with StopRequest() as stop:
        while step < tc.steps:
            model.train()
            loss_sum = torch.zeros((), device=d.device)
            terms_sum: dict[str, float] = {}
            for micro in range(tc.grad_accumulation):
                batch = _to_device(next(batches), d.device)
                consumed += 1
                rng = SampleRandomness(tc.seed, step * tc.grad_accumulation + micro, batch["index"])
                with distributed.gradient_sync(dmodel, micro == tc.grad_accumulation - 1):
                    with autocast:
                        loss, terms = task.loss(dmodel, batch, rng)
                    scaler.scale(loss / tc.grad_accumulation).backward()
                loss_sum += loss.detach() / tc.grad_accumulation
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / tc.grad_accumulation
            loss_value = distributed.mean_across(loss_sum, d)
            if distributed.any_across(not torch.isfinite(loss_value).item(), d):
                raise TrainingError(f"loss is {loss_value.item()} at step {step + 1}; stopped without saving. "
                                    f"Last good checkpoint: {last_good or 'none yet'} (resume from it, perhaps with "
                                    f"a lower train.lr or train.mixed_precision=no)")
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            step += 1

            window["loss"] += loss_value.item()
            window["steps"] += 1
            for k, v in terms_sum.items():
                window["terms"][k] = window["terms"].get(k, 0.0) + v
            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - window["time"]
                n = window["steps"]
                monitor.scalars(step, {
                    "train/loss": window["loss"] / n, "train/grad_norm": float(grad_norm),
                    "train/lr": lr, "train/samples_per_s": n * per_step / elapsed,
                    "train/peak_memory_mb": peak_memory_mb(d.device),
                    **{f"train/{k}": v / n for k, v in window["terms"].items()}})
                window = {"loss": 0.0, "time": time.perf_counter(), "steps": 0, "terms": {}}
            if tc.sample_every and step % tc.sample_every == 0 and (d.is_main or fsdp):  # FSDP: all ranks run it
                images = task.sample(ema.model if ema else model, _to_device(preview, d.device), step)
                if images is not None and d.is_main:
                    log.info("samples: %s", monitor.images(step, images))
            interrupted = distributed.any_across(stop.signal is not None, d)
            if step % tc.checkpoint_every == 0 or step == tc.steps or interrupted:
                checkpoint(step)
            if interrupted:
                monitor.close()
                log.warning("interrupted at step %d; continue with: --resume %s", step, run_dir)
                raise Interrupted(stop.signal or signal.SIGTERM, run_dir)
    monitor.close()
    log.info("done: %d steps, weights in %s", step, run_dir)
    return run_dir
