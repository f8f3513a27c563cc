"""Processes under torchrun: process-group set-up (gloo on CPU, nccl on GPU), DDP or FSDP, small collectives.

FSDP is PyTorch's fully_shard (FSDP2): each transformer block's parameters, gradients and optimiser state are
sharded across processes; state dicts are gathered to full tensors for checkpoints and exports (a resume keeps
the strategy: FSDP's optimiser state is keyed by parameter name, DDP's by position).
"""

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.errors import UserError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), or run as one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}") if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, dev)


def teardown(sync: bool = False) -> None:
    """Leave the process group; sync: after a barrier, so that no rank destroys it while another still uses it."""
    if dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


STRATEGIES = ("ddp", "fsdp")


def uses_fsdp(strategy: str, d: Dist) -> bool:
    if strategy not in STRATEGIES:
        raise UserError(f"train.distributed must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return strategy == "fsdp" and d.enabled


def shard(model: nn.Module) -> nn.Module:
    """fully_shard every transformer block (the base's and any ControlNet copies: every PixArtBlock), then the root;
    in place."""
    from torch.distributed.fsdp import fully_shard

    from models.pixart import PixArtBlock

    for block in [m for m in model.modules() if isinstance(m, PixArtBlock)]:
        fully_shard(block)
    fully_shard(model)
    return model


def wrap(model: nn.Module, d: Dist, strategy: str = "ddp") -> nn.Module:
    """The module the loss calls: DDP around it, FSDP-sharded in place, or itself with one process."""
    if not d.enabled:
        return model
    if uses_fsdp(strategy, d):
        return shard(model)
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(dmodel: nn.Module, enabled: bool):
    """Skip the gradient all-reduce of the first micro-batches of an accumulated step (DDP or FSDP)."""
    if enabled:
        yield
    elif isinstance(dmodel, DistributedDataParallel):
        with dmodel.no_sync():
            yield
    elif hasattr(dmodel, "set_requires_gradient_sync"):
        dmodel.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            dmodel.set_requires_gradient_sync(True)
    else:
        yield


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: nn.Module, fsdp: bool) -> dict:
    """Full (unsharded) CPU state dict; under FSDP a collective whose result only rank 0 receives."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_model_state(model: nn.Module, state: dict, fsdp: bool, strict: bool = True) -> None:
    """Load a full state dict (every rank holds it) into a plain or FSDP-sharded module."""
    if not fsdp:
        model.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=strict))


def optimizer_state(model: nn.Module, optimizer, fsdp: bool) -> dict:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


def mean_across(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a tensor over all processes (itself with one process)."""
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world_size
    return value


def any_across(flag: bool, d: Dist) -> bool:
    """True if the flag is set on any process (for stopping every rank together)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
