"""torch.compile for sampling and training, with a fallback to eager mode that says why.

    denoiser = compile_module(model, "the transformer")        # sample.compile / --compile

One compiled graph per input shape (dynamic=False: each resolution bucket compiles once, on its first call, and
gets kernels specialised to its sizes). Inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR, default
/tmp/torchinductor_$USER) makes a second run of the same shapes load the kernels instead of recompiling.

Where compiling cannot work - no C++ compiler for inductor's CPU kernels, a failure inside dynamo or inductor - the
module runs eagerly and one warning names the cause; real errors of the model itself still raise.
"""

import logging
import os
import shutil
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)

FORWARDED = ("micro_conditions", "guidance_embedding", "in_channels", "out_channels", "patch_size")


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


class CompiledModule(nn.Module):
    """A module run through torch.compile; on a compile failure it warns once and runs eagerly from then on."""

    def __init__(self, module: nn.Module, what: str, **options):
        super().__init__()
        self.module = module
        self.what = what
        self.compiled = torch.compile(module, dynamic=False, **options)
        self.eager = False
        for name in FORWARDED:  # what the pipeline reads off a denoiser
            if hasattr(module, name):
                setattr(self, name, getattr(module, name))

    def forward(self, *args, **kwargs):
        if not self.eager:
            try:
                return self.compiled(*args, **kwargs)
            except _compile_errors() as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log.warning("torch.compile of %s failed (%s: %s); running it eagerly", self.what, type(e).__name__,
                            first[:300])
                self.eager = True
        return self.module(*args, **kwargs)


def compile_module(module: nn.Module, what: str, device: torch.device | str, **options) -> nn.Module:
    """`module` compiled on `device` (for sampling, or for training: backward compiles too), or `module` itself
    (with a warning) where compiling cannot work here. A failure inside dynamo/inductor at a call also falls back
    to eager; an error of the model itself then raises from the eager run, with its own traceback."""
    problem = compiler_problem(device)
    if problem:
        log.warning("--compile: %s; running %s eagerly", problem, what)
        return module
    # Notices addressed to torch/torchao developers, not to users: a CPU machine has no CUDA runtime, and torchao's
    # int8 tensors lack a hash for AOT-autograd's cache (inference does not use that cache).
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching.*")
    return CompiledModule(module, what, **options)
