"""torch.compile for sampling and training, with a fallback to eager mode that says why.

    denoiser = compile_module(model, "the transformer", device)                   # the whole forward as one graph
    denoiser = compile_module(model, "the transformer", device, regions=blocks)   # each block (regional compile)
    denoiser = compile_module(model, "the transformer", device, mode="reduce-overhead")   # + CUDA graphs

One compiled graph per input shape (dynamic=False: each resolution bucket compiles once, on its first call, and
gets kernels specialised to its sizes). Inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR, default
/tmp/torchinductor_$USER) makes a second run of the same shapes load the kernels instead of recompiling.

Regional compilation (`regions`): the given submodules (the transformer's blocks, and a ControlNet's copies of them)
are compiled in place and everything around them runs eagerly. Blocks of one class share their code, so dynamo
traces one graph for all 28 of XL-2 instead of one graph 28 blocks long: compiling takes seconds instead of
minutes, and the repeated work (attention, MLP) is where the fusions pay.

mode="reduce-overhead" replays each compiled graph as a CUDA graph (one launch instead of one per kernel). A
CUDA graph's outputs live in memory its next replay overwrites, so every top-level call starts a new graph
generation and returns a copy of the output (the samplers keep earlier outputs, e.g. DPM-Solver's history).

Where compiling cannot work - no C++ compiler for inductor's CPU kernels, a failure inside dynamo or inductor - the
module runs eagerly and one warning names the cause; real errors of the model itself still raise.
"""

import logging
import os
import shutil
import warnings
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compiler_problem(device: torch.device | str) -> str | None:
    """Why torch.compile cannot run on `device` here, or None."""
    device = torch.device(device)
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
        if compiler is None or shutil.which(compiler) is None:
            return "no C++ compiler (g++/clang++) for inductor's CPU kernels: install one, e.g. apt install g++"
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (inductor's GPU kernels need it): pip install triton"
    return None


def _compile_errors() -> tuple[type, ...]:
    errors = [torch._dynamo.exc.TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


def _uncompile(module: nn.Module) -> None:
    """Undo nn.Module.compile(): the module's calls go to its eager forward again (the attribute compile() sets)."""
    module._compiled_call_impl = None


class CompiledModule(nn.Module):
    """A module run through torch.compile (whole, or its `regions` compiled in place); on a compile failure it warns
    once and runs eagerly from then on."""

    def __init__(self, module: nn.Module, what: str, regions: Iterable[nn.Module] | None = None,
                 mode: str = "default", **options):
        super().__init__()
        self.module = module
        self.what = what
        self.regions = list(regions) if regions is not None else None
        self.cuda_graphs = mode in CUDA_GRAPH_MODES
        options = {"dynamic": False, **({} if mode == "default" else {"mode": mode}), **options}
        if self.regions is None:
            self.compiled = torch.compile(module, **options)
        else:
            for region in self.regions:
                region.compile(**options)
            self.compiled = module
        self.eager = False
        for name in getattr(module, "denoiser_attributes", ()):  # what the pipeline reads off a denoiser
            if hasattr(module, name):
                setattr(self, name, getattr(module, name))

    def forward(self, *args, **kwargs):
        if not self.eager:
            try:
                if self.cuda_graphs:  # a new generation: the previous call's graph outputs may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                    return self.compiled(*args, **kwargs).clone()
                return self.compiled(*args, **kwargs)
            except _compile_errors() as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning("torch.compile of %s failed (%s: %s); running it eagerly", self.what, type(e).__name__,
                            first[:300])
                self.eager = True
                for region in self.regions or ():
                    _uncompile(region)
        return self.module(*args, **kwargs)


def compile_module(module: nn.Module, what: str, device: torch.device | str, regions: Iterable[nn.Module] | None = None,
                   mode: str = "default", **options) -> nn.Module:
    """`module` compiled on `device` (for sampling, or for training: backward compiles too), or `module` itself
    (with a warning) where compiling cannot work here. regions: compile only these submodules, in place (see the
    module docstring); mode: torch.compile's mode (MODES). A failure inside dynamo/inductor at a call also falls
    back to eager; an error of the model itself then raises from the eager run, with its own traceback."""
    if mode not in MODES:
        from common.errors import UserError

        raise UserError(f"unknown compile mode {mode!r}: use one of {', '.join(MODES)}")
    problem = compiler_problem(device)
    if problem:
        log.warning("--compile: %s; running %s eagerly", problem, what)
        return module
    if mode in CUDA_GRAPH_MODES and torch.device(device).type != "cuda":
        log.warning("compile mode %s records CUDA graphs, which %s has not: compiling %s without them", mode,
                    torch.device(device), what)
        mode = "default"
    # Notices addressed to torch/torchao developers, not to users: a CPU machine has no CUDA runtime, and torchao's
    # int8 tensors lack a hash for AOT-autograd's cache (inference does not use that cache).
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching.*")
    return CompiledModule(module, what, regions, mode, **options)
