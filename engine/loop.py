"""The training loop shared by every trainer. A trainer is a Task: its model, its trainable parameters and its loss.

    python train/train.py --config CONFIG                      # one process
    torchrun --nproc-per-node 2 train/train.py --config CONFIG  # DDP (gloo on CPU, nccl on GPU)
    python train/train.py --resume runs/00003-pixart           # continue exactly where it stopped

The loop owns everything else: AdamW with linear warm-up, gradient accumulation and clipping, EMA, mixed
precision, DDP, numbered run folders, logs (stdout, log.txt, TensorBoard), sample grids, atomic checkpoints with
the full training state, exact resume, NaN/inf detection and Ctrl-C / SIGTERM handling.
"""

import contextlib
import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError
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


@dataclass
class Trainable:
    """One network a task trains and how: its own AdamW, learning-rate schedule, gradient clipping, EMA and rhythm.

    Fields left None take the `train:` section's value, so a single-network task needs only its module.
    """

    module: nn.Module                       # holds the trainable parameters (frozen ones inside are skipped)
    param_groups: list[dict] | None = None  # AdamW groups {"params": [...], "lr_scale": x}; None: every trainable one
    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    lr_schedule: str | None = None          # constant | cosine
    grad_clip: float | None = None          # <= 0: no clipping (the norm is still logged)
    ema_decay: float | None = None          # 0: no EMA of this network
    updates_per_step: int = 1               # optimiser updates of this network per training step (each on its own
                                            # batch): DMD2 updates its fake score ~5 times per generator update

    def resolved(self, tc) -> "Trainable":
        """A copy with every None field taken from the `train:` section tc."""
        defaults = dict(lr=tc.lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps, weight_decay=tc.weight_decay,
                        warmup_steps=tc.warmup_steps, lr_schedule=tc.lr_schedule, grad_clip=tc.grad_clip,
                        ema_decay=tc.ema_decay)
        out = replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        if out.updates_per_step < 1:
            raise UserError(f"a network's updates per training step must be >= 1, got {out.updates_per_step}")
        if out.param_groups is None:
            out.param_groups = [{"params": [p for p in out.module.parameters() if p.requires_grad]}]
        return out


class Task:
    """What a trainer supplies; everything else is the loop's.

    A single-network task sets `model` and implements `loss(model, batch, rng)`; the loop trains it with the
    `train:` section's optimiser settings. A task that trains several networks (DMD2: a generator and a fake score)
    returns them from `networks()` as name -> Trainable, in the order they update within a training step, and
    implements `update(name, model, batch, rng)`, the loss of one optimiser update of network `name`.
    `exported_network` (default: the first) is the one exported and sampled; its EMA, if any, is what export()
    receives.

    A task may own more networks than it trains: frozen ones (a teacher, a ControlNet's base) it loads from files
    and names in `references()` (recorded in every checkpoint; a resume whose references changed is refused), and
    state that follows training (an EMA target) it returns from `state_dict()` and updates in `after_update()`.
    Frozen parameters inside a trained network (requires_grad False, e.g. under LoRA adapters) are never copied into
    the EMA or written into training checkpoints.
    """

    model: nn.Module  # a single-network task's network; DDP wraps it, the EMA follows its trainable parameters
    exported_network: str | None = None  # the network exported and sampled; None: the first of networks()
    trained_networks: tuple[str, ...] = ("model",)  # the names networks() returns: a resume checks them first

    @classmethod
    def trained_network_names(cls, cfg) -> tuple[str, ...]:
        """The names networks() will return for this config (read before anything loads, e.g. to check a resume);
        default: trained_networks."""
        return cls.trained_networks

    def networks(self) -> dict[str, Trainable]:
        """The trained networks in update order (default: `model`, as the `train:` section says)."""
        return {"model": Trainable(self.model, self.parameter_groups())}

    def parameter_groups(self) -> list[dict]:
        """AdamW parameter groups of `model`: {"params": [...], optional "lr_scale": multiplier of train.lr}."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def update(self, name: str, model: nn.Module, batch: dict, rng: SampleRandomness) -> tuple[torch.Tensor, dict]:
        """Scalar loss of one micro-batch for an update of network `name` (model: that network as the loop runs
        it, wrapped for DDP/FSDP/compile) and per-term scalars to log. Default: loss() for a single network."""
        return self.loss(model, batch, rng)

    def loss(self, model: nn.Module, batch: dict, rng: SampleRandomness) -> tuple[torch.Tensor, dict]:
        """Scalar loss of one micro-batch (mean over its samples) and per-term scalars to log."""
        raise NotImplementedError

    def after_update(self, name: str, model: nn.Module) -> None:
        """Called after every optimiser update of network `name` (default: after_step for a single network)."""
        self.after_step(model)

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step of a single-network task (e.g. to update an EMA target)."""

    def state_dict(self) -> dict:
        """Task-owned state to checkpoint for an exact resume (tensors, numbers, strings)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""

    def references(self) -> dict[str, dict]:
        """Frozen networks read from files, e.g. {"teacher": {"path": ..., "sha256": ...}}."""
        return {}

    def sample(self, model: nn.Module, batch: dict, step: int) -> torch.Tensor | None:
        """Images (N, 3, H, W) in [0, 1] for the sample grid (batch: cached samples for their captions)."""
        return None

    def export(self, state_dict: dict, path: Path, metadata: dict) -> None:
        """Write weights (the EMA's when there is an EMA) for sampling, e.g. as this project's safetensors."""


class TrainingError(RuntimeError):
    """Training stopped on a problem (NaN loss, ...); the message names the step and the last good checkpoint."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving a resumable checkpoint."""

    def __init__(self, signum: int, run_dir: Path, step: int | None = None):
        at = f" at step {step} (checkpoint saved)" if step is not None else ""
        super().__init__(f"interrupted by {signal.Signals(signum).name}{at}; continue with --resume {run_dir}")
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


LR_SCHEDULES = ("constant", "cosine")


def lr_multiplier(warmup_steps: int, schedule: str, total_steps: int):
    """step -> factor of train.lr: linear warm-up from 0, then constant or a cosine decay to 0 at total_steps."""
    if schedule not in LR_SCHEDULES:
        raise UserError(f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def frozen_prefixes(model: nn.Module) -> list[str]:
    """Names of the largest submodules whose parameters are all frozen (their weights come from elsewhere)."""
    out = []

    def visit(module: nn.Module, prefix: str):
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(prefix)
            return
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(model, "")
    if "" in out:
        raise ValueError("the task's model has no trainable parameter")
    return out


def frozen_keys(model: nn.Module) -> set[str]:
    """State-dict keys a training checkpoint leaves out: frozen parameters, and the buffers of wholly frozen
    submodules (a teacher's or base model's null caption). They come back from the task's references on resume."""
    prefixes = tuple(frozen_prefixes(model))
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return frozen | {k for k in model.state_dict() if prefixes and k.startswith(prefixes)}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _autocast(mode: str, device: torch.device):
    if mode == "no":
        return contextlib.nullcontext()
    if mode not in ("bf16", "fp16"):
        raise UserError(f"train.mixed_precision must be no, bf16 or fp16, got {mode!r}")
    if mode == "fp16" and device.type != "cuda":
        raise UserError("train.mixed_precision=fp16 needs a GPU (its gradient scaler); use bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def preview_indices(buckets: dict[str, list[int]], count: int) -> list[int]:
    """The first `count` samples of the largest aspect-ratio bucket: the sample grid is one batch of one shape."""
    largest = max(buckets.values(), key=len)
    return sorted(largest)[:count]


def feature_data(cfg):
    """The feature cache of cfg.data.cache_dir, checked against the model's size, and its bucketed batch sampler."""
    from data.buckets import BucketBatchSampler
    from data.features import FeatureDataset, collate

    dataset = FeatureDataset(cfg.data.cache_dir)
    dataset.check_fits(cfg.model.latent_size, cfg.model.in_channels)
    return dataset, collate, BucketBatchSampler


def train(cfg, make_task, dataset_factory=feature_data, resume: str | None = None) -> Path:
    """Run (or resume) training of the task `make_task(cfg, device)`; returns the run folder.

    dataset_factory(cfg) returns (dataset with .buckets, collate function, batch-sampler class); tests inject
    in-memory data through it.
    """
    d = distributed.setup(cfg.train.device)
    try:
        run = _train(cfg, make_task, dataset_factory, resume, d)
    except BaseException:
        distributed.teardown()
        raise
    distributed.teardown(sync=True)  # every rank done before the group goes (gloo aborts on pending work otherwise)
    return run


def _resume_state(cfg, resume) -> tuple[Path, dict]:
    """The run folder and training state to resume from, checked against the config."""
    run_dir, ckpt = resolve_resume(resume)
    state = load_state(ckpt, torch.device("cpu"))
    defaults = to_dict(type(cfg)())["model"]  # keys added to the config since the checkpoint was written
    saved = {**defaults, **state["config"]["model"]}
    differences = config_differences(saved, to_dict(cfg)["model"], "model.")
    if differences:
        raise ResumeError(f"cannot resume {ckpt}: the model config differs from the checkpoint's:\n  "
                          + "\n  ".join(differences) + "\nresume with the run's own config.yaml, or start a "
                          "new run with train.init_from to fine-tune from those weights")
    if "networks" not in state:  # a checkpoint of a single-network run written before tasks had several networks
        state["networks"] = {"model": {k: state.pop(k) for k in ("model", "ema", "optimizer", "scheduler", "scaler")}}
        state["updates"] = state["step"]
    return run_dir, state


def _new_run_dir(cfg, d) -> Path:
    names = [str(new_run_dir(cfg.train.runs_dir, cfg.train.name)) if d.is_main else None]
    if d.enabled:
        torch.distributed.broadcast_object_list(names, src=0)
    return Path(names[0])


def _check_references(saved: dict, current: dict, ckpt_step: int) -> None:
    """A resume must see the same frozen networks (by content hash) that the run was trained against."""
    changed = [f"{name}: {saved.get(name, {}).get('path')} (sha256 {saved.get(name, {}).get('sha256', '?')[:12]}) "
               f"-> {current.get(name, {}).get('path')} (sha256 {current.get(name, {}).get('sha256', '?')[:12]})"
               for name in sorted(set(saved) | set(current))
               if saved.get(name, {}).get("sha256") != current.get(name, {}).get("sha256")]
    if changed:
        raise ResumeError(f"cannot resume at step {ckpt_step}: the frozen networks it was trained against changed:"
                          f"\n  " + "\n  ".join(changed) + "\nresume with the original files (the run's own "
                          "settings: --config RUN/config.yaml --resume RUN), or start a new run")


class TrainedNetwork:
    """One trained network inside the loop: its module, the runner the loss calls (DDP/FSDP-wrapped, compiled),
    AdamW, learning-rate schedule, gradient scaler and EMA, and the keys its checkpoints leave out."""

    def __init__(self, name: str, spec: Trainable, tc, d, total_steps: int, respec=None):
        """respec() gives the network's Trainable again: under FSDP, sharding replaces the parameters, so the
        optimiser's groups are taken afresh after it."""
        self.name, self.spec, self.module = name, spec, spec.module
        self.frozen = frozen_keys(self.module)
        if tc.gradient_checkpointing:
            for module in self.module.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = True
        self.fsdp = distributed.uses_fsdp(tc.distributed, d)
        self.wrapped = distributed.wrap(self.module, d, tc.distributed)
        self.runner = self.wrapped
        if tc.compile:
            from models.compiled import compile_module

            self.runner = compile_module(self.wrapped, f"the {name}", d.device)
        # after sharding: the shadows are sharded too
        self.ema = EMA(self.module, spec.ema_decay) if spec.ema_decay > 0 else None
        if self.fsdp and respec is not None:
            spec = respec()
        groups = spec.param_groups
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(
            [{**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": spec.lr * g.get("lr_scale", 1.0)}
             for g in groups], lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay)
        # the schedule counts this network's own updates, so a network updated k times per step warms up in k x
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(spec.warmup_steps, spec.lr_schedule, total_steps * spec.updates_per_step))
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.mixed_precision == "fp16")

    def state(self) -> dict:
        """Everything of this network a resume needs (collective under FSDP: every rank calls it)."""
        return dict(model={k: v for k, v in distributed.model_state(self.module, self.fsdp).items()
                           if k not in self.frozen},
                    ema=self.ema.state_dict() if self.ema is not None else None,
                    optimizer=distributed.optimizer_state(self.module, self.optimizer, self.fsdp),
                    scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict())

    def load(self, state: dict) -> None:
        missing = sorted(set(self.module.state_dict()) - set(state["model"]) - self.frozen)
        unexpected = sorted(set(state["model"]) - set(self.module.state_dict()))
        if missing or unexpected:
            raise ResumeError(f"the checkpoint's {self.name} does not fit the task's: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
        distributed.load_model_state(self.module, state["model"], self.fsdp, strict=False)
        distributed.load_optimizer_state(self.module, self.optimizer, state["optimizer"], self.fsdp)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def averaged(self):
        """Within the block the module holds its EMA weights (if it has an EMA)."""
        return self.ema.applied(self.module) if self.ema is not None else contextlib.nullcontext()

    def exported_weights(self) -> dict:
        """The full state with the EMA's values in place (collective under FSDP), copied to the CPU before the
        training values come back (a plain state_dict() shares the parameters' storage)."""
        with self.averaged():
            return {k: v.detach().to("cpu", copy=True) for k, v in distributed.model_state(self.module,
                                                                                           self.fsdp).items()}


def _train(cfg, make_task, dataset_factory, resume, d) -> Path:
    tc = cfg.train
    run_dir, state = _resume_state(cfg, resume) if resume else (None, None)
    autocast = _autocast(tc.mixed_precision, d.device)
    seed_everything(tc.seed)  # the same initial weights on every rank (FSDP does not broadcast them)
    task = make_task(cfg, d.device)
    seed_everything(tc.seed + d.rank)
    if state is not None:
        _check_references(state.get("references", {}), task.references(), state["step"])
    specs = {name: spec.resolved(tc) for name, spec in task.networks().items()}
    if not specs:
        raise ValueError("the task trains no network: networks() returned none")
    if tuple(specs) != tuple(task.trained_network_names(cfg)):
        raise ValueError(f"the task's networks() {list(specs)} differ from its trained_network_names(cfg) "
                         f"{list(task.trained_network_names(cfg))}")
    dataset, collate, sampler_cls = dataset_factory(cfg)  # a missing or unfitting cache stops before the run folder
    run_dir = run_dir or _new_run_dir(cfg, d)  # only once the task is built: a failed start leaves no folder
    setup_logging(run_dir, d.is_main)
    if d.is_main:
        save_config(cfg, run_dir / "config.yaml")
        log.info("run %s (%s), %d process(es) on %s; resolved config in %s", run_dir,
                 "resumed" if state else "new", d.world_size, d.device, run_dir / "config.yaml")
    nets = {name: TrainedNetwork(name, spec, tc, d, tc.steps, lambda name=name: task.networks()[name].resolved(tc))
            for name, spec in specs.items()}
    exported = task.exported_network or next(iter(nets))
    if exported not in nets:
        raise ValueError(f"the task's exported_network {exported!r} is not one of its networks {sorted(nets)}")
    main = nets[exported]  # exported and sampled
    if len(nets) > 1 and d.is_main:
        log.info("networks, in update order: %s", ", ".join(f"{n} ({s.updates_per_step} update(s) per step, lr "
                                                             f"{s.lr:g})" for n, s in specs.items()))

    sampler = sampler_cls(dataset.buckets, tc.batch_size, tc.seed, d.rank, d.world_size)
    step, updates, consumed = 0, 0, 0
    if state is not None:
        saved = set(state["networks"])
        if saved != set(nets):
            raise ResumeError(f"cannot resume: the checkpoint trains the networks {sorted(saved)}, this task "
                              f"{sorted(nets)} (a run of another trainer?)")
        for name, net in nets.items():
            net.load(state["networks"][name])
        task.load_state_dict(state.get("task", {}))
        step, updates, consumed = state["step"], state["updates"], state["batches_consumed"]
        set_rng_state(state["rng"])
        log.info("resumed from step %d (%d batches consumed)", step, consumed)
    sampler.load_state_dict(sampler.state_at(consumed))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.num_workers, pin_memory=d.device.type == "cuda")
    batches = iter(loader)
    preview = collate([dataset[i] for i in preview_indices(dataset.buckets, cfg.data.sample_captions)])

    monitor = Monitor(run_dir, d.is_main)
    last_good = latest_checkpoint(run_dir)

    def checkpoint(at_step: int) -> Path | None:
        nonlocal last_good
        distributed.barrier(d)
        # Gathering full state dicts is collective under FSDP: every rank takes part, rank 0 writes.
        networks = {name: net.state() for name, net in nets.items()}
        task_state = task.state_dict()
        export = main.exported_weights()
        if d.is_main:
            last_good = save_state(run_dir, at_step, dict(
                networks=networks, exported=exported, batches_consumed=consumed, updates=updates, rng=rng_state(),
                config=to_dict(cfg),
                task=task_state, references=task.references()), tc.keep_checkpoints)
            task.export(export, run_dir / ("ema.safetensors" if main.ema else "weights.safetensors"),
                        {"step": str(at_step), "config": to_yaml(cfg)})
            log.info("checkpoint %s", last_good)
        distributed.barrier(d)
        return last_good

    def one_update(net: TrainedNetwork) -> tuple[float, float, float, dict]:
        """Accumulate grad_accumulation micro-batches of net's loss and take one optimiser step; returns the loss,
        the gradient norm, the learning rate used and the mean of each logged term."""
        nonlocal consumed, updates
        net.optimizer.zero_grad(set_to_none=True)  # another network's loss may have reached these parameters
        loss_sum = torch.zeros((), device=d.device)
        terms_sum: dict[str, float] = {}
        for micro in range(tc.grad_accumulation):
            batch = _to_device(next(batches), d.device)
            consumed += 1
            rng = SampleRandomness(tc.seed, updates * tc.grad_accumulation + micro, batch["index"])
            with distributed.gradient_sync(net.wrapped, micro == tc.grad_accumulation - 1):
                with autocast:
                    loss, terms = task.update(net.name, net.runner, batch, rng)
                net.scaler.scale(loss / tc.grad_accumulation).backward()
            loss_sum += loss.detach() / tc.grad_accumulation
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / tc.grad_accumulation
        loss_value = distributed.mean_across(loss_sum, d)
        if distributed.any_across(not torch.isfinite(loss_value).item(), d):
            which = f" of the {net.name}" if len(nets) > 1 else ""
            raise TrainingError(f"loss{which} is {loss_value.item()} at step {step + 1}; stopped without saving. "
                                f"Last good checkpoint: {last_good or 'none yet'} (resume from it, perhaps with "
                                f"a lower train.lr or train.mixed_precision=no)")
        net.scaler.unscale_(net.optimizer)
        clip = net.spec.grad_clip if net.spec.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(net.params, clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
        lr = net.scheduler.get_last_lr()[0]  # the rate this update used
        net.scaler.step(net.optimizer)
        net.scaler.update()
        net.scheduler.step()
        net.optimizer.zero_grad(set_to_none=True)
        if net.ema is not None:
            net.ema.update(net.module)
        task.after_update(net.name, net.module)
        updates += 1
        return loss_value.item(), float(grad_norm), lr, terms_sum

    window = {"time": time.perf_counter(), "steps": 0, "scalars": {}}
    per_step = tc.batch_size * d.world_size * tc.grad_accumulation * sum(s.updates_per_step for s in specs.values())
    with StopRequest() as stop:
        while step < tc.steps:
            for net in nets.values():
                net.module.train()
            scalars: dict[str, float] = {}
            for name, net in nets.items():
                prefix = "train/" if len(nets) == 1 else f"train/{name}/"
                for _ in range(net.spec.updates_per_step):
                    loss, grad_norm, lr, terms = one_update(net)
                    n = net.spec.updates_per_step
                    for key, value in ((f"{prefix}loss", loss), (f"{prefix}grad_norm", grad_norm),
                                       *((f"train/{k}", v) for k, v in terms.items())):
                        scalars[key] = scalars.get(key, 0.0) + value / n
                    scalars[f"{prefix}lr"] = lr
            step += 1

            window["steps"] += 1
            for k, v in scalars.items():
                window["scalars"][k] = window["scalars"].get(k, 0.0) + v
            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - window["time"]
                n = window["steps"]
                averaged = {k: v / n if not k.endswith("/lr") else scalars[k] for k, v in window["scalars"].items()}
                monitor.scalars(step, {**averaged, "train/samples_per_s": n * per_step / elapsed,
                                       "train/peak_memory_mb": peak_memory_mb(d.device)})
                window = {"time": time.perf_counter(), "steps": 0, "scalars": {}}
            if tc.sample_every and step % tc.sample_every == 0 and (d.is_main or main.fsdp):  # FSDP: all ranks
                with main.averaged():
                    images = task.sample(main.module, _to_device(preview, d.device), step)
                if images is not None and d.is_main:
                    log.info("samples: %s", monitor.images(step, images))
            interrupted = distributed.any_across(stop.signal is not None, d)
            if step % tc.checkpoint_every == 0 or step == tc.steps or interrupted:
                checkpoint(step)
            if interrupted:
                monitor.close()  # the caller reports the interruption once (Interrupted's message)
                raise Interrupted(stop.signal or signal.SIGTERM, run_dir, step)
    monitor.close()
    log.info("done: %d steps, weights in %s", step, run_dir)
    return run_dir
