"""Benchmarks that compare side by side in one process (timings on shared machines are noisy otherwise).

    python tools/benchmark.py transformer --sizes 256 512 --dtypes fp32 bf16

transformer: one forward of this project's PixArt and of diffusers' PixArtTransformer2DModel on the same
weights, batch 1, 120 caption tokens. Prints the time of each, the ratio diffusers / ours (> 1: ours is faster)
and each one's fraction of the machine's measured matmul peak for that dtype.
"""

import argparse
import logging
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.checkpoint import diffusers_config, official_to_diffusers
from models.pixart import PixArtConfig, build_pixart

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PIXART_PRESETS = {256: (32, 0.5, False), 512: (64, 1.0, False), 1024: (128, 2.0, True)}  # latent, pe, micro
log = logging.getLogger("benchmark")


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    """Best wall time of fn() over reps runs, after warmup runs (the minimum is the least disturbed run)."""
    return min(time_interleaved([fn], device, reps, warmup)[0])


def time_interleaved(fns, device: torch.device, reps: int, warmup: int = 1) -> list[list[float]]:
    """Wall times of each fn over reps rounds; each round runs all fns, in reversed order every other round,
    so that drifts of a shared machine (other jobs, clocks) hit every contender alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for r in range(reps):
        order = list(range(len(fns)))[:: -1 if r % 2 else 1]
        for i in order:
            sync(device)
            start = time.perf_counter()
            fns[i]()
            sync(device)
            times[i].append(time.perf_counter() - start)
    return times


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of a large n x n x n linear layer (x @ W^T, the layout every nn.Linear uses) for dtype.

    The layout matters: on CPUs without native bf16, x @ W^T runs ~20x faster than x @ W in bf16.
    """
    x = torch.randn(n, n, device=device).to(dtype)
    w = torch.randn(n, n, device=device).to(dtype)
    fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    best = min(timeit(fn, device, 1, warmup=1 if i == 0 else 0) for i in range(reps))
    return 2 * n**3 / best


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def pixart_inputs(cfg: PixArtConfig, image_size: int, device, dtype, batch: int = 1):
    """Latents, timesteps, caption features, mask and micro-conditions for one image size."""
    side = image_size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=gen).to(device, dtype)
    t = torch.full((batch,), 500, device=device)
    y = torch.randn(batch, cfg.caption_tokens, cfg.caption_channels, generator=gen).to(device, dtype)
    mask = torch.ones(batch, cfg.caption_tokens, dtype=torch.long, device=device)
    mask[:, cfg.caption_tokens // 2:] = 0  # a realistic prompt pads about half of the 120 tokens
    micro = {}
    if cfg.micro_conditions:
        micro = dict(resolution=torch.tensor([[image_size] * 2] * batch, device=device, dtype=dtype),
                     aspect_ratio=torch.ones(batch, 1, device=device, dtype=dtype))
    return x, t, y, mask, micro


def diffusers_twin(model, cfg: PixArtConfig):
    """diffusers' PixArtTransformer2DModel holding the same weights as `model`."""
    from diffusers import PixArtTransformer2DModel

    dc = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    twin = PixArtTransformer2DModel(**dc)
    twin.load_state_dict(official_to_diffusers(model.state_dict()), strict=False)  # pos_embed buffer is derived
    return twin.eval()


def bench_forward(ours, theirs, cfg: PixArtConfig, size: int, dtype_name: str, device, args) -> dict:
    """One row of the transformer table: both models on the same inputs, timed interleaved."""
    dtype = DTYPES[dtype_name]
    ours.to(device, dtype)
    theirs.to(device, dtype)
    x, t, y, mask, kw = pixart_inputs(cfg, size, device, dtype, args.batch)
    added = kw or {"resolution": None, "aspect_ratio": None}

    def run_ours():
        return ours(x, t, y, mask, **kw)

    def run_theirs():
        return theirs(x, y, t, added_cond_kwargs=added, encoder_attention_mask=mask)

    with torch.inference_mode():
        flops = count_flops(run_ours)
        peak = matmul_peak(dtype, device)
        t_ours, t_theirs = map(min, time_interleaved([run_ours, run_theirs], device, args.reps))
    return dict(size=size, dtype=dtype_name, ours=t_ours, diffusers=t_theirs, ratio=t_theirs / t_ours,
                tflop=flops / 1e12, peak=peak, ours_mfu=flops / t_ours / peak, diffusers_mfu=flops / t_theirs / peak)


def bench_transformer(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for size in args.sizes:
        latent, pe, micro = PIXART_PRESETS[size]
        cfg = PixArtConfig(arch=args.arch, latent_size=latent, pe_interpolation=pe, micro_conditions=micro)
        ours = build_pixart(cfg).eval()
        theirs = diffusers_twin(ours, cfg)
        for name in args.dtypes:
            rows.append(bench_forward(ours, theirs, cfg, size, name, device, args))
            log.info("%s", format_row(rows[-1]))
    return rows


HEADER = ("| image | dtype | TFLOP/forward | ours (s) | diffusers (s) | diffusers/ours | ours % of matmul peak "
          "| diffusers % of peak | matmul peak (TFLOP/s) |\n|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['size']}px | {r['dtype']} | {r['tflop']:.3f} | {r['ours']:.3f} | {r['diffusers']:.3f} "
            f"| {r['ratio']:.2f} | {100 * r['ours_mfu']:.0f}% | {100 * r['diffusers_mfu']:.0f}% "
            f"| {r['peak'] / 1e12:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    tr = sub.add_parser("transformer", help="one forward: ours vs diffusers on the same weights")
    tr.add_argument("--sizes", type=int, nargs="+", default=[256, 512], choices=sorted(PIXART_PRESETS))
    tr.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    tr.add_argument("--arch", default="XL")
    tr.add_argument("--batch", type=int, default=1)
    tr.add_argument("--reps", type=int, default=4, help="timed rounds; the best of each is reported")
    tr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.info("device %s, torch %s, %d threads", args.device, torch.__version__, torch.get_num_threads())
    log.info(HEADER)
    bench_transformer(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
