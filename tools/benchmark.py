"""Benchmarks that compare side by side in one process (timings on shared machines are noisy otherwise).

    python tools/benchmark.py transformer --sizes 256 512 --dtypes fp32 bf16
    python tools/benchmark.py transformer --variant sigma --sizes 512 1024 --dtypes bf16
    python tools/benchmark.py kv --sizes 1024 2048 --depth 2 --dtype fp32
    python tools/benchmark.py pipeline --size 256 --dtype fp32
    python tools/benchmark.py train --archs XL S --size 256 --batch 2
    python tools/benchmark.py lcd --archs S --size 256 --batch 2 --lora-ranks 0 32
    python tools/benchmark.py control --arch XL --size 256 --variants transformer:1 transformer:13 unet:14
    python tools/benchmark.py quantize --size 512 --modes int8
    python tools/benchmark.py memory --modes none int8 --device cuda

transformer: one forward of this project's PixArt and of diffusers' PixArtTransformer2DModel on the same
weights, batch 1, 120 caption tokens (--variant sigma: PixArt-Sigma's configuration, 300 tokens, no micro-conditions,
sizes 512 / 1024 / 2048). Prints the time of each, the ratio diffusers / ours (> 1: ours is faster)
and each one's fraction of the machine's measured matmul peak for that dtype.

pipeline: one image, text encoding + denoising + VAE decoding, this project's pipeline against
diffusers.PixArtAlphaPipeline on one random-weight pipeline folder (XL transformer, T5 with d_model 4096 and
--t5-layers layers, SD-size VAE), for PixArt-delta (LCM, 4 steps, no guidance) and PixArt-alpha (DPM-Solver,
14 and 20 steps, guidance 4.5 with the negative prompt ""). "overhead" is the share of our total spent outside
the transformer's own forwards, text encoding and VAE decoding.

train: the PixArt-alpha training step (forward, IDDPM loss, backward, AdamW) on random latents and captions,
with and without gradient checkpointing, fp32 and bf16 autocast: samples/s, peak memory, and the fraction of
the matmul peak counting 6 x parameters x tokens FLOPs per sample (attention not counted).

lcd: one step of train/train_lcm.py's latent consistency distillation (student forward and backward, the frozen
teacher with and without the caption, the EMA target, AdamW, the target update) on random teacher weights: full
distillation against LCM-LoRA side by side, seconds per step and peak memory (GPU).

quantize: one XL-2 forward (random weights) of diffusers in fp32 and of ours in fp32 and --modes (int8, fp8 on
sm89+ GPUs), eager and torch.compile'd, interleaved: seconds, speed-up over diffusers fp32, the deviation from the
fp32 output; then the final images of quantised vs fp32 generation (8-bit levels), on random XL-2 weights and on
the shipped shapes student.

memory: peak memory of one PixArt-delta image through the pipeline alone (T5 encodes and is freed, then the
transformer and VAE run; --low-memory's one-image VAE decoding), float vs --quantize.

kv: PixArt-Sigma's KV token compression: one forward of the same Sigma model uncompressed and with keys and values
compressed (2x2 cells: 4x fewer) in the second half of its blocks (the official kvcompress configs' blocks 14..27),
interleaved: seconds each and the speed-up. --depth keeps the per-block cost (tokens and width, so the ratio of
attention to linear work) and cuts the number of blocks, for a CPU; the speed-up of half the blocks compressed does
not depend on the depth.

control: one denoiser forward of the base alone and with a ControlNet branch (ControlNet-Transformer with N
copies, ControlNet-UNet), interleaved: seconds, the branch's share of a sampling step, peak memory (GPU).
"""

import argparse
import contextlib
import copy
import itertools
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.monitor import peak_memory_mb
from models.formats.diffusers import diffusers_config, official_to_diffusers
from models.pixart import PixArtConfig, build_pixart
from models.variants import VARIANTS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PIXART_PRESETS = {256: (32, 0.5, False), 512: (64, 1.0, False), 1024: (128, 2.0, True)}  # latent, pe, micro
SIGMA_VARIANTS = {512: "sigma-512", 1024: "sigma-1024-ms", 2048: "sigma-2k"}  # models/variants.py
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


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int | None = None, reps: int = 5) -> float:
    """Best FLOP/s of a large n x n x n linear layer (x @ W^T, the layout every nn.Linear uses) for dtype.

    The layout matters: on CPUs without native bf16, x @ W^T runs ~20x faster than x @ W in bf16.
    """
    n = n or (8192 if device.type == "cuda" else 2048)
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
    return dict(size=size, variant=cfg.variant or "alpha", dtype=dtype_name, ours=t_ours, diffusers=t_theirs,
                ratio=t_theirs / t_ours, tflop=flops / 1e12, peak=peak, ours_mfu=flops / t_ours / peak,
                diffusers_mfu=flops / t_theirs / peak)


def bench_transformer(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for size in args.sizes:
        if args.variant == "sigma":
            if size not in SIGMA_VARIANTS:
                raise SystemExit(f"--variant sigma sizes: {', '.join(map(str, SIGMA_VARIANTS))}")
            cfg = VARIANTS[SIGMA_VARIANTS[size]].config(arch=args.arch)
        else:
            if size not in PIXART_PRESETS:
                raise SystemExit(f"--variant alpha sizes: {', '.join(map(str, PIXART_PRESETS))}")
            latent, pe, micro = PIXART_PRESETS[size]
            cfg = PixArtConfig(arch=args.arch, latent_size=latent, pe_interpolation=pe, micro_conditions=micro)
        ours = build_pixart(cfg).eval()
        theirs = diffusers_twin(ours, cfg)
        for name in args.dtypes:
            rows.append(bench_forward(ours, theirs, cfg, size, name, device, args))
            log.info("%s", format_row(rows[-1]))
    return rows


KV_HEADER = ("| variant | image | tokens | blocks (compressed) | keys per compressed block | dtype | s/forward plain "
             "| s/forward compressed | speed-up |\n|---|---|---|---|---|---|---|---|---|")


def bench_kv(args) -> list[dict]:
    """The same random Sigma model uncompressed and with KV compression on its second half of blocks, interleaved."""
    rows = []
    for size in args.sizes:
        rows.append(kv_row(args, size))
        r = rows[-1]
        log.info("| %s | %dpx | %d | %d (%d) | %d | %s | %.3f | %.3f | %.2fx |", r["variant"], size, r["tokens"],
                 r["depth"], r["compressed"], r["keys"], args.dtype, r["plain"], r["compressed_s"], r["speedup"])
    return rows


def kv_row(args, size: int) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    variant = VARIANTS[SIGMA_VARIANTS[size]]
    plain_cfg = variant.config(arch=args.arch, depth=args.depth)
    depth = plain_cfg.dims()[0]
    comp_cfg = variant.config(arch=args.arch, depth=depth, kv_compress_blocks=list(range(depth // 2, depth)))
    plain = build_pixart(plain_cfg).eval()
    comp = build_pixart(comp_cfg).eval()
    comp.load_state_dict(plain.state_dict(), strict=False)  # the same network; the compression is average-init
    plain.to(device, dtype)
    comp.to(device, dtype)
    x, t, y, mask, _ = pixart_inputs(plain_cfg, size, device, dtype, args.batch)
    with torch.inference_mode():
        t_plain, t_comp = map(min, time_interleaved([lambda: plain(x, t, y, mask), lambda: comp(x, t, y, mask)],
                                                    device, args.reps))
    tokens = (size // 8 // plain_cfg.patch_size) ** 2
    return dict(variant=variant.name, size=size, tokens=tokens, depth=depth, compressed=depth - depth // 2,
                keys=tokens // plain_cfg.kv_compress_stride**2, dtype=args.dtype, plain=t_plain, compressed_s=t_comp,
                speedup=t_plain / t_comp, arch=args.arch, device=device_name(args.device))


PIPELINE_CASES = {"lcm4": ("PixArt-delta LCM", "lcm", 4, 0.0), "dpm14": ("PixArt-alpha DPM", "dpm", 14, 4.5),
                  "dpm20": ("PixArt-alpha DPM", "dpm", 20, 4.5)}
# Our side of the pipeline table: (quantize, compile, compile mode). The first must be "float" (the eager --dtype
# pipeline): every other variant's images are compared with its images.
PIPELINE_VARIANTS = {"float": ("none", False, "default"), "int8": ("int8", False, "default"),
                     "fp8": ("fp8", False, "default"), "compiled": ("none", True, "default"),
                     "compiled-cg": ("none", True, "reduce-overhead"), "fp8-compiled": ("fp8", True, "default"),
                     "fp8-compiled-cg": ("fp8", True, "reduce-overhead"), "int8-compiled": ("int8", True, "default")}


def shared_xl_folder(args, scheduler: str = "dpm") -> tuple[Path, PixArtConfig, object]:
    """The random-weight XL-2 1024-MS pipeline folder of --folder (written there if it holds none yet, so several
    benchmark runs share one T5-XXL), else a temporary one. Returns (folder, transformer config, cleanup handle)."""
    latent, pe, micro = PIXART_PRESETS[1024]  # the MS model, run at --size
    model_cfg = PixArtConfig(arch=args.arch, latent_size=latent, pe_interpolation=pe, micro_conditions=micro)
    tmp = None
    folder = Path(args.folder) if args.folder else None
    if folder is None:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name) / "pipeline"
    if not (folder / "model_index.json").is_file():
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(0)
        # N(0, 0.02) everywhere: zero-initialised layers would make the denoiser trivially cheap to verify, not to run
        sd = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in build_pixart(model_cfg).state_dict().items()
              if "y_embedding" not in k}
        xl_pipeline_folder(folder, sd, model_cfg, args.t5_layers, scheduler, device=args.device,
                           t5_dtype=DTYPES[args.dtype] if args.device != "cpu" else torch.float32)
        log.info("wrote the random XL-2 pipeline folder %s (T5 with %d layers) in %.0f s", folder, args.t5_layers,
                 time.perf_counter() - start)
    return folder, model_cfg, tmp


def image_levels(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max, mean) absolute difference of two image batches in [0, 1], in 8-bit levels."""
    diff = (a.float() - b.float()).abs() * 255
    return diff.max().item(), diff.mean().item()


def bench_pipeline(args) -> list[dict]:
    """One image end to end, our pipeline variants against diffusers.PixArtAlphaPipeline (its default settings, in
    --dtype) on the same folder and seeds, interleaved per case; our images are compared with our eager --dtype
    images and with diffusers'."""
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler, PixArtAlphaPipeline

    from configs import Config, load_config
    from models.autoencoder import load_autoencoder
    from models.text_encoder import load_text_encoder
    from pipeline.generate import (
        Timings,
        encode_prompts,
        initial_noise,
        load_denoiser,
        plan,
        sample_images,
    )

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    folder, model_cfg, tmp = shared_xl_folder(args)
    prompt = ["a photograph of an astronaut riding a horse on the moon, detailed, 8k"]
    side = args.size // 8
    pipe = PixArtAlphaPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    rows, reference, vae_fast = [], {}, None

    def config_for(variant: str, case: str):
        quantize, compiled, mode = PIPELINE_VARIANTS[variant]
        _, sampler, steps, guidance = PIPELINE_CASES[case]
        return load_config(Config, "pixart_alpha_1024", [
            f"sample.checkpoint={folder}", f"text_encoder.path={folder}", f"autoencoder.path={folder}",
            f"text_encoder.dtype={args.dtype}", f"autoencoder.dtype={args.dtype}", "text_encoder.clean_captions=false",
            f"sample.dtype={args.dtype}", f"sample.device={args.device}", "sample.uncond=negative",
            "sample.resolution_binning=false", f"sample.width={args.size}", f"sample.height={args.size}",
            f"sample.quantize={quantize}", f"sample.compile={compiled}", f"sample.compile_mode={mode}",
            f"sample.compile_scope={args.compile_scope}", f"sample.sampler={sampler}", f"sample.steps={steps}",
            f"sample.guidance={guidance}"])

    base = config_for("float", args.cases[0])
    request = plan(base, prompt)
    t5 = load_text_encoder(base.text_encoder, device)  # float T5 for every variant: the table compares denoisers
    vae = load_autoencoder(base.autoencoder, device)
    for variant in args.variants:
        cfg = config_for(variant, args.cases[0])
        request = plan(cfg, prompt)
        start = time.perf_counter()
        model = load_denoiser(cfg, request)
        load_s = time.perf_counter() - start
        if cfg.sample.compile and vae_fast is None:
            vae_fast = load_autoencoder(base.autoencoder, device)
            vae_fast.compile(channels_last=device.type == "cuda")
        our_vae = vae_fast if cfg.sample.compile else vae
        for case in args.cases:
            name, sampler, steps, guidance = PIPELINE_CASES[case]
            s = config_for(variant, case).sample
            timings, theirs = Timings(), Timings()

            def run_ours(timings=timings, s=s, model=model, our_vae=our_vae, request=request):
                start = time.perf_counter()
                feats = encode_prompts(t5, s, request.prompts, model_cfg.caption_channels)
                sync(device)
                timings.text_encoding += time.perf_counter() - start
                return sample_images(model, our_vae, base.diffusion.build(), s, request, feats, timings,
                                     progress=False)

            def run_theirs(theirs=theirs, steps=steps, guidance=guidance):
                start = time.perf_counter()
                embeds = pipe.encode_prompt(prompt, guidance > 1, negative_prompt="", device=device,
                                            clean_caption=False, max_sequence_length=120)
                sync(device)
                theirs.text_encoding += time.perf_counter() - start
                start = time.perf_counter()
                pe_, pm, ne, nm = embeds
                latents = pipe(prompt_embeds=pe_, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                               negative_prompt_attention_mask=nm, negative_prompt=None, num_inference_steps=steps,
                               guidance_scale=guidance, height=args.size, width=args.size, output_type="latent",
                               latents=initial_noise([0], (4, side, side), device, dtype),
                               use_resolution_binning=False).images
                sync(device)
                theirs.denoising += time.perf_counter() - start
                start = time.perf_counter()
                image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
                image = pipe.image_processor.postprocess(image, output_type="pt")
                sync(device)
                theirs.vae_decoding += time.perf_counter() - start
                return image

            pipe.scheduler = (LCMScheduler if sampler == "lcm" else DPMSolverMultistepScheduler).from_config(
                pipe.scheduler.config)
            with torch.inference_mode():
                start = time.perf_counter()
                ours_image = run_ours()  # warm-up: compiles a compiled variant for this batch shape
                warmup_s = time.perf_counter() - start
                their_image = run_theirs().cpu()
                for t in (timings, theirs):
                    for f in ("text_encoding", "denoising", "vae_decoding"):
                        setattr(t, f, 0.0)
                time_interleaved([run_ours, run_theirs], device, args.reps, warmup=0)
                forwards = Timings(per_forward=True)  # one more run, synchronised around each forward
                sample_images(model, our_vae, base.diffusion.build(), s, request,
                              encode_prompts(t5, s, request.prompts, model_cfg.caption_channels), forwards,
                              progress=False)
            reference.setdefault(case, ours_image)
            n = args.reps
            ours_total = (timings.text_encoding + timings.denoising + timings.vae_decoding) / n
            theirs_total = (theirs.text_encoding + theirs.denoising + theirs.vae_decoding) / n
            vs_float, vs_diffusers = image_levels(ours_image, reference[case]), image_levels(ours_image, their_image)
            rows.append(dict(
                case=f"{name} {steps} steps", variant=variant, ours=ours_total, diffusers=theirs_total,
                speedup=theirs_total / ours_total, ours_text=timings.text_encoding / n,
                ours_denoise=timings.denoising / n, ours_vae=timings.vae_decoding / n,
                theirs_text=theirs.text_encoding / n, theirs_denoise=theirs.denoising / n,
                theirs_vae=theirs.vae_decoding / n,
                overhead=(forwards.denoising - forwards.transformer_forwards) / max(forwards.denoising, 1e-9),
                warmup_s=warmup_s, load_s=load_s, max_levels_vs_float=vs_float[0], mean_levels_vs_float=vs_float[1],
                max_levels_vs_diffusers=vs_diffusers[0], mean_levels_vs_diffusers=vs_diffusers[1]))
            log.info("%s", format_pipeline_row(rows[-1]))
            emit(args, rows)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if tmp is not None:
        tmp.cleanup()
    return rows


def format_pipeline_row(r: dict) -> str:
    return (f"| {r['case']} | {r['variant']} | {r['ours_text']:.3f} / {r['ours_denoise']:.3f} / {r['ours_vae']:.3f} "
            f"| {r['ours']:.3f} | {r['theirs_text']:.3f} / {r['theirs_denoise']:.3f} / {r['theirs_vae']:.3f} "
            f"| {r['diffusers']:.3f} | {r['speedup']:.2f} | {100 * r['overhead']:.1f}% | {r['warmup_s']:.1f} "
            f"| {r['max_levels_vs_float']:.1f} / {r['mean_levels_vs_float']:.2f} "
            f"| {r['max_levels_vs_diffusers']:.1f} / {r['mean_levels_vs_diffusers']:.2f} |")


def bench_vae(args) -> list[dict]:
    """The SD VAE's decoder at --size alone, diffusers' default (NCHW, eager) against channels-last, compiled and
    both, interleaved: where the pipeline's VAE time goes and what each change buys."""
    from models.autoencoder import AutoencoderConfig, load_autoencoder

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    folder, _, tmp = shared_xl_folder(args)
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    latents = latents.to(device, dtype)
    variants = {}
    for name, channels_last, compiled in (("default", False, False), ("channels-last", True, False),
                                          ("compiled", False, True), ("compiled + channels-last", True, True)):
        if compiled and not args.compile:
            continue
        vae = load_autoencoder(AutoencoderConfig(path=str(folder), dtype=args.dtype), device)
        if compiled:
            torch.backends.cudnn.benchmark = True
            vae.compile(channels_last=channels_last)
        elif channels_last:
            vae.vae.decoder.to(memory_format=torch.channels_last)
        variants[name] = vae
    rows = []
    with torch.inference_mode():
        warm = {}
        for name, vae in variants.items():
            start = time.perf_counter()
            vae.decode(latents)
            sync(device)
            warm[name] = time.perf_counter() - start
        times = time_interleaved([lambda vae=vae: vae.decode(latents) for vae in variants.values()], device,
                                 args.reps, warmup=1)
        reference = variants["default"].decode(latents).float()
        for (name, vae), ts in zip(variants.items(), times):
            error = (vae.decode(latents).float() - reference).abs().max().item()
            rows.append(dict(variant=name, size=args.size, dtype=args.dtype, seconds=min(ts), warmup_s=warm[name],
                             max_error=error))
            log.info("| %s | %dpx | %s | %.4f | %.1f | %.1e |", name, args.size, args.dtype, min(ts), warm[name],
                     error)
            emit(args, rows)
    if tmp is not None:
        tmp.cleanup()
    return rows


def train_step_row(cfg: PixArtConfig, checkpointing: bool, dtype_name: str, args, device,
                   compiled: bool = False) -> dict:
    """Time the training step of one configuration and read its peak memory (compiled: the model's forward and
    backward through torch.compile, compiled in the warm-up step)."""
    from diffusion.losses import DiffusionLoss
    from diffusion.schedule import NoiseSchedule
    from models.compiled import compile_module

    model = build_pixart(cfg, device).train()
    model.gradient_checkpointing = checkpointing
    runner = compile_module(model, "the transformer", device) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = DiffusionLoss(NoiseSchedule.linear())
    x, _, y, mask, kw = pixart_inputs(cfg, args.size, device, torch.float32, args.batch)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    noise = torch.randn_like(x)
    dtype = DTYPES[dtype_name]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype_name != "fp32" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = loss_fn(runner, x, t, noise, y=y, mask=mask, **kw)[0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timeit(step, device, args.reps)
    tokens = (args.size // 8 // cfg.patch_size) ** 2
    flops = 6 * sum(p.numel() for p in model.parameters()) * tokens * args.batch
    return dict(samples_s=args.batch / seconds, mem=peak_memory_mb(device), mfu=flops / seconds /
                matmul_peak(dtype, device))


def bench_train(args) -> list[dict]:
    """Training-step throughput and peak memory for each (arch, checkpointing, dtype)."""
    device = torch.device(args.device)
    latent, pe, micro = PIXART_PRESETS[args.size if args.size in PIXART_PRESETS else 256]
    rows = []
    for arch in args.archs:
        cfg = PixArtConfig(arch=arch, latent_size=latent, pe_interpolation=pe, micro_conditions=micro)
        for ckpt, name, compiled in itertools.product(args.checkpointing, args.dtypes,
                                                      [False, True] if args.compile else [False]):
            r = dict(arch=arch, ckpt=ckpt, dtype=name, compiled=compiled,
                     **train_step_row(cfg, ckpt, name, args, device, compiled))
            rows.append(r)
            log.info("| %s/2 | %dpx | %d | %s | %s%s | %.2f | %.0f | %.0f%% |", arch, args.size, args.batch,
                     "yes" if ckpt else "no", name, ", compiled" if compiled else "", r["samples_s"], r["mem"],
                     100 * r["mfu"])
            emit(args, rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def lcd_step_row(arch: str, lora_rank: int, checkpointing: bool, dtype_name: str, args, device, teacher: Path,
                 frozen: str = "fp32") -> dict:
    """Time one latent-consistency-distillation step of train/train_lcm.py's task (student forward and backward,
    teacher forwards with and without the caption, target forward, AdamW, target EMA) and read its peak memory."""
    from configs import Config, load_config
    from engine.randomness import SampleRandomness
    from tasks.lcd import LCMTask

    latent, pe, micro = PIXART_PRESETS[args.size]
    cfg = load_config(Config, "lcm_512", [f"model.arch={arch}", f"model.latent_size={latent}",
                                          f"model.pe_interpolation={pe}", f"model.micro_conditions={micro}",
                                          f"distill.teacher={teacher}", f"distill.lora_rank={lora_rank}",
                                          f"train.frozen_dtype={frozen}"])
    task = LCMTask(cfg, device)
    model = task.model.train()
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = checkpointing
    optimizer = torch.optim.AdamW([p for g in task.parameter_groups() for p in g["params"]], lr=1e-5, eps=1e-10)
    x, _, y, mask, kw = pixart_inputs(cfg.model, args.size, device, torch.float32, args.batch)
    batch = {"latent": x, "y": y, "mask": mask, "index": torch.arange(args.batch, device=device), **kw}
    dtype = DTYPES[dtype_name]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype_name != "fp32" else contextlib.nullcontext()
    counter = iter(range(10**9))

    def step():
        with autocast:
            loss, _ = task.loss(model, batch, SampleRandomness(0, next(counter), batch["index"]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        task.after_step(model)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timeit(step, device, args.reps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(seconds=seconds, mem=peak_memory_mb(device), trainable=trainable)


def dmd_step_rows(args) -> list[dict]:
    """One DMD2 fake-score update and one generator update of tasks/dmd.py (XL-2 at --size, random teacher
    weights), each as the loop runs it (autocast forward, backward, AdamW): seconds and peak memory of each."""
    from configs import Config, load_config
    from engine.randomness import SampleRandomness
    from models.checkpoint import save_checkpoint
    from tasks.dmd import DMDTask

    device = torch.device(args.device)
    latent, pe, micro = PIXART_PRESETS[args.size]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg_model = PixArtConfig(arch=args.archs[0], latent_size=latent, pe_interpolation=pe, micro_conditions=micro)
        teacher = Path(tmp) / "teacher.safetensors"
        save_checkpoint(build_pixart(cfg_model).state_dict(), cfg_model, teacher, "safetensors")
        cfg = load_config(Config, "dmd_512", [f"model.arch={args.archs[0]}", f"model.latent_size={latent}",
                                              f"model.pe_interpolation={pe}", f"model.micro_conditions={micro}",
                                              f"dmd.teacher={teacher}", f"train.frozen_dtype={args.frozen_dtypes[0]}"])
        task = DMDTask(cfg, device)
        for module in (task.generator, task.fake):
            for m in module.modules():
                if hasattr(m, "gradient_checkpointing"):
                    m.gradient_checkpointing = args.checkpointing[0]
        x, _, y, mask, kw = pixart_inputs(cfg.model, args.size, device, torch.float32, args.batch)
        batch = {"latent": x, "y": y, "mask": mask, "index": torch.arange(args.batch, device=device), **kw}
        autocast = torch.autocast(device.type, dtype=DTYPES[args.dtypes[0]]) if args.dtypes[0] != "fp32" else \
            contextlib.nullcontext()
        counter = iter(range(10**9))
        for name, module in (("fake_score", task.fake), ("generator", task.generator)):
            optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)

            def step(name=name, module=module, optimizer=optimizer):
                with autocast:
                    loss, _ = task.update(name, module, batch, SampleRandomness(0, next(counter), batch["index"]))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timeit(step, device, args.reps)
            rows.append(dict(update=name, seconds=seconds, samples_s=args.batch / seconds, mem=peak_memory_mb(device)))
            log.info("| %s/2 | %dpx | %d | DMD2 %s update | %.2f | %.1f | %.0f |", args.archs[0], args.size, args.batch,
                     name, seconds, rows[-1]["samples_s"], rows[-1]["mem"])
            emit(args, rows)
            del optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def bench_lcd(args) -> list[dict]:
    """The LCD step for full distillation and LCM-LoRA, side by side, on random teacher weights."""
    from models.checkpoint import save_checkpoint

    device = torch.device(args.device)
    latent, pe, micro = PIXART_PRESETS[args.size]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            cfg = PixArtConfig(arch=arch, latent_size=latent, pe_interpolation=pe, micro_conditions=micro)
            teacher = Path(tmp) / f"{arch}.safetensors"
            save_checkpoint(build_pixart(cfg).state_dict(), cfg, teacher, "safetensors")
            for rank, ckpt, name, frozen in itertools.product(args.lora_ranks, args.checkpointing, args.dtypes,
                                                              args.frozen_dtypes):
                r = dict(arch=arch, rank=rank, ckpt=ckpt, dtype=name, frozen=frozen,
                         **lcd_step_row(arch, rank, ckpt, name, args, device, teacher, frozen))
                r["samples_s"] = args.batch / r["seconds"]
                rows.append(r)
                log.info("| %s/2 | %dpx | %d | %s | %s | %s | %s | %.2f | %.1f | %.0f | %.1fM |", arch, args.size,
                         args.batch, f"LoRA r{rank}" if rank else "full", "yes" if ckpt else "no", name, frozen,
                         r["seconds"], r["samples_s"], r["mem"], r["trainable"] / 1e6)
                emit(args, rows)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def control_train_rows(args) -> list[dict]:
    """One training step of the PixArt-alpha model (every weight trains) beside one of each ControlNet branch (the
    base frozen, stored as train.frozen_dtype, only the branch trains: train/train_controlnet.py's task), batch
    --batch, gradient checkpointing on, --dtype autocast: seconds, samples/s, peak memory, the step's cost over the
    base's own training step."""
    from diffusion.losses import DiffusionLoss
    from diffusion.schedule import NoiseSchedule
    from engine.precision import store_frozen
    from models.controlnet import ControlConfig, ControlledPixArt, build_branch

    device = torch.device(args.device)
    latent, pe, micro = PIXART_PRESETS[args.size]
    cfg = PixArtConfig(arch=args.arch, latent_size=latent, pe_interpolation=pe, micro_conditions=micro)
    loss_fn = DiffusionLoss(NoiseSchedule.linear())
    x, _, y, mask, kw = pixart_inputs(cfg, args.size, device, torch.float32, args.batch)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    noise, control = torch.randn_like(x), torch.randn_like(x)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype]) if args.dtype != "fp32" else \
        contextlib.nullcontext()
    rows = []
    for name, cc in [("PixArt-alpha (all weights train)", None)] + [
            (f"ControlNet {d} N={n} (base frozen, {args.frozen_dtype})", ControlConfig(design=d, num_blocks=int(n)))
            for d, n in (v.split(":") for v in args.variants)]:
        base = build_pixart(cfg, device).train()
        if cc is None:
            model, extra = base, {}
        else:
            branch = build_branch(base, cc).to(device).requires_grad_(True)
            store_frozen(base.requires_grad_(False), args.frozen_dtype)
            model, extra = ControlledPixArt(base, branch).train(), {"control": control}
        for module in model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)

        def step(model=model, optimizer=optimizer, extra=extra):
            with autocast:
                loss = loss_fn(model, x, t, noise, y=y, mask=mask, **kw, **extra)[0].mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timeit(step, device, args.reps)
        rows.append(dict(name=name, seconds=seconds, samples_s=args.batch / seconds, mem=peak_memory_mb(device),
                         trainable=sum(p.numel() for p in params) / 1e6, vs_base=seconds / rows[0]["seconds"] - 1
                         if rows else 0.0))
        r = rows[-1]
        log.info("| %s/2 | %dpx | %d | %s | %.3f | %.1f | %.0f | %.0fM | %+.0f%% |", args.arch, args.size, args.batch,
                 name, r["seconds"], r["samples_s"], r["mem"] or 0, r["trainable"], 100 * r["vs_base"])
        emit(args, rows)
        del model, base, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_control(args) -> list[dict]:
    """One denoiser forward of the base alone and of base + ControlNet branch (N copies, or the UNet design),
    interleaved in one process: seconds, the branch's share of the step, peak memory (GPU)."""
    from models.controlnet import ControlConfig, ControlledPixArt, build_branch

    if args.train:
        return control_train_rows(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    latent, pe, micro = PIXART_PRESETS[args.size]
    cfg = PixArtConfig(arch=args.arch, latent_size=latent, pe_interpolation=pe, micro_conditions=micro)
    base = build_pixart(cfg).to(device, dtype).eval()
    x, t, y, mask, kw = pixart_inputs(cfg, args.size, device, dtype, args.batch)
    control = torch.randn_like(x)
    variants = [("base alone", None)] + [(f"{d} N={n}", ControlConfig(design=d, num_blocks=n))
                                        for d, n in (v.split(":") for v in args.variants)
                                        for n in [int(n)]]
    models, rows = [], []
    for name, cc in variants:
        model = base if cc is None else ControlledPixArt(base, build_branch(base, cc).to(device, dtype)).eval()
        models.append((name, model))

    def runner(model):
        if model is base:
            return lambda: base(x, t, y, mask, **kw)
        return lambda: model(x, t, y, mask, control=control, **kw)

    with torch.inference_mode():
        times = [min(ts) for ts in time_interleaved([runner(m) for _, m in models], device, args.reps)]
        for (name, model), seconds in zip(models, times):
            mem = None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                runner(model)()
                mem = peak_memory_mb(device)
            rows.append(dict(name=name, seconds=seconds, share=1 - times[0] / seconds, mem=mem,
                             params=sum(p.numel() for p in model.parameters()) / 1e6))
            log.info("| %s/2 | %dpx | %s | %s | %.3f | %.0f%% | %s | %.0fM |", args.arch, args.size, args.dtype, name,
                     seconds, 100 * rows[-1]["share"], f"{mem:.0f}" if mem is not None else "-", rows[-1]["params"])
            emit(args, rows)
    return rows


QUANTIZE_HEADER = ("| transformer | image | batch | s/forward | speed-up vs diffusers fp32 | max error | relative "
                   "error | block weights (MB) |\n|---|---|---|---|---|---|---|---|")
CONTROL_TRAIN_HEADER = ("| model | image | batch | step | s/step | samples/s | peak memory (MB) | trainable | "
                        "step cost vs PixArt-alpha's |\n|---|---|---|---|---|---|---|---|---|")
CONTROL_HEADER = ("| model | image | dtype | denoiser | s/forward | branch share | peak memory (MB) | parameters |\n"
                  "|---|---|---|---|---|---|---|---|")
DMD_HEADER = "| model | image | batch | step | s/update | samples/s | peak memory (MB) |\n|---|---|---|---|---|---|---|"
LCD_HEADER = ("| model | image | batch | student | grad. checkpointing | dtype | frozen teacher | s/step | samples/s | "
              "peak memory (MB) | trainable params |\n|---|---|---|---|---|---|---|---|---|---|---|")
TRAIN_HEADER = ("| model | image | batch | grad. checkpointing | dtype | samples/s | peak memory (MB) "
                "| % of matmul peak |\n|---|---|---|---|---|---|---|---|")
PIPELINE_HEADER = ("| case | ours | ours: text / denoise / VAE (s) | ours total (s) | diffusers: text / denoise / "
                   "VAE (s) | diffusers total (s) | diffusers/ours | our overhead | warm-up (s) | image vs ours bf16: "
                   "max / mean levels | vs diffusers: max / mean |\n|---|---|---|---|---|---|---|---|---|---|---|")
VAE_HEADER = ("| VAE decoder | image | dtype | s/decode | warm-up (s) | max error vs default |\n"
              "|---|---|---|---|---|---|")
HEADER = ("| image | dtype | TFLOP/forward | ours (s) | diffusers (s) | diffusers/ours | ours % of matmul peak "
          "| diffusers % of peak | matmul peak (TFLOP/s) |\n|---|---|---|---|---|---|---|---|---|")


def xl_pipeline_folder(folder, sd: dict, cfg: PixArtConfig, t5_layers: int, scheduler: str = "dpm",
                       device: str = "cpu", t5_dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight diffusers PixArt pipeline folder of the real sizes around `sd`: T5 of width 4096 with
    t5_layers layers (XXL has 24; drawn on `device`, stored in t5_dtype), the SD VAE's widths."""
    from tools.random_weights import write_random_pipeline

    t5 = dict(num_layers=t5_layers, num_heads=64, d_ff=10240, d_kv=64, device=device, dtype=t5_dtype)
    return write_random_pipeline(folder, sd, cfg, t5=t5, vae=dict(block_out_channels=(128, 256, 512, 512),
                                                                  layers_per_block=2, norm_num_groups=32),
                                 scheduler=scheduler)


def emit(args, rows: list[dict]) -> None:
    """Write the rows so far to --json (after every row: a run cut short keeps what it measured)."""
    if getattr(args, "json", None):
        import json

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"benchmark": args.what, "device": device_name(args.device),
                                    "torch": torch.__version__, "rows": rows}, indent=1, default=str) + "\n")


def device_name(device: str) -> str:
    """The GPU's name (e.g. NVIDIA H200) or 'cpu'."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def random_xl(size: int, micro: bool | None = None) -> tuple[PixArtConfig, dict]:
    """XL-2 config for `size` and random weights (N(0, 0.02) everywhere: zero-initialised layers would make a
    quantised model trivially exact)."""
    latent, pe, ms = PIXART_PRESETS[size]
    cfg = PixArtConfig(arch="XL", latent_size=latent, pe_interpolation=pe, micro_conditions=ms if micro is None
                       else micro)
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in build_pixart(cfg).state_dict().items()}
    return cfg, sd


def bench_quantize(args) -> list[dict]:
    """The transformer forward in float and 8 bit, eager and compiled, against diffusers' fp32, interleaved; then
    the final images of int8 generation against fp32 generation."""
    from models.compiled import compile_module
    from models.quantize import block_linears, quantize_transformer

    device = torch.device(args.device)
    cfg, sd = random_xl(args.size)
    if not args.timing:
        return image_deviation(args, cfg, sd)
    fp32 = build_pixart(cfg).eval()
    fp32.load_state_dict(sd)
    theirs = diffusers_twin(fp32, cfg)
    x, t, y, mask, kw = pixart_inputs(cfg, args.size, device, torch.float32, args.batch)
    added = kw or {"resolution": None, "aspect_ratio": None}
    contenders = {"diffusers fp32": lambda: theirs(x, y, t, added_cond_kwargs=added, encoder_attention_mask=mask)}
    models = {"ours fp32": fp32}
    for mode in args.modes:
        models[f"ours {mode}"] = quantize_transformer(copy.deepcopy(fp32), mode)
    if args.compile:
        for name in list(models):
            models[f"{name} compiled"] = compile_module(models[name], name, device)
    for name, model in models.items():
        contenders[name] = lambda model=model: model(x, t, y, mask, **kw)
    with torch.inference_mode():
        reference = fp32(x, t, y, mask, **kw)
        outputs = {}
        for name, fn in contenders.items():
            start = time.perf_counter()
            outputs[name] = fn()  # also the warm-up (compiles)
            log.info("warm-up %s: %.1f s", name, time.perf_counter() - start)
        times = dict(zip(contenders, map(min, time_interleaved(list(contenders.values()), device, args.reps, 0))))
    rows = []
    base = times["diffusers fp32"]
    for name, seconds in times.items():
        out = outputs[name].sample if hasattr(outputs[name], "sample") else outputs[name]  # diffusers' output class
        error = (out.float() - reference).abs()
        model = models.get(name.removesuffix(" compiled"))
        weight_mb = None
        if model is not None:
            weight_mb = sum(m.weight.qdata.numel() if hasattr(m.weight, "qdata") else m.weight.numel() * 4
                            for m in block_linears(model).values()) / 2**20
        rows.append(dict(name=name, seconds=seconds, speedup=base / seconds, max_error=error.max().item(),
                         rel_error=(error.norm() / reference.norm()).item(), block_weights_mb=weight_mb))
        r = rows[-1]
        log.info("| %s | %dpx | %d | %.2f | %.2f | %.1e | %.1e | %s |", name, args.size, args.batch, seconds,
                 r["speedup"], r["max_error"], r["rel_error"], f"{weight_mb:.0f}" if weight_mb else "-")
    if args.images:
        rows += image_deviation(args, cfg, sd)
    return rows


SHAPE_PROMPTS = ["a large red circle at the center", "a small blue square at the top left",
                 "a medium green triangle at the bottom right", "a large yellow cross at the center",
                 "a small purple diamond at the middle left", "a medium orange circle at the top center",
                 "a large pink square at the bottom center", "a medium brown diamond at the center"]


def image_deviation(args, cfg: PixArtConfig, sd: dict) -> list[dict]:
    """Final images of --quantize MODE vs fp32 generation (same seeds): on random XL-2 weights (a random pipeline
    folder at --size, PixArt-delta LCM 4 steps) and on the shipped shapes student (its default command)."""
    from configs import Config, load_config
    from pipeline.generate import generate, plan

    tmp = tempfile.TemporaryDirectory()
    folder = xl_pipeline_folder(tmp.name, sd, cfg, t5_layers=2, scheduler="lcm")
    cases = {
        "random XL-2": ("pixart_delta_lcm_1024", [
            f"sample.checkpoint={folder}", f"text_encoder.path={folder}", f"autoencoder.path={folder}",
            "text_encoder.dtype=fp32", "autoencoder.dtype=fp32", "text_encoder.clean_captions=false",
            "sample.resolution_binning=false", f"sample.width={args.size}", f"sample.height={args.size}",
            "sample.device=" + args.device],
            ["a photograph of an astronaut riding a horse on the moon"]),
        "shipped student": ("lcm_shapes", ["sample.device=" + args.device, "sample.batch_size=8"], SHAPE_PROMPTS),
    }
    rows = []
    for case, (config, overrides, prompts) in cases.items():
        images = {}
        for mode in ("none", *args.modes):
            cfg_run = load_config(Config, config, [*overrides, f"sample.quantize={mode}"])
            with torch.inference_mode():
                images[mode] = generate(cfg_run, plan(cfg_run, prompts), progress=False).images
        for mode in args.modes:
            diff = (images[mode] - images["none"]).abs() * 255  # in 8-bit levels
            rows.append(dict(name=f"images {case} {mode}", max_levels=diff.max().item(),
                             mean_levels=diff.mean().item()))
            log.info("| %s | %s | %d images | max %.1f | mean %.2f levels of 255 |", case, mode, len(prompts),
                     rows[-1]["max_levels"], rows[-1]["mean_levels"])
    tmp.cleanup()
    return rows


def bench_memory(args) -> list[dict]:
    """Peak memory of one PixArt-delta image (LCM 4 steps) through pipeline.generate alone: T5 (random, d_model 4096,
    --t5-layers layers; 24 = T5-XXL's real size) encodes and is freed, then the XL-2 1024-MS transformer and the
    SD-size VAE run. GPU: torch.cuda.max_memory_allocated; CPU: the process's peak resident set (all of Python)."""
    import resource

    from configs import Config, load_config
    from pipeline.generate import generate, plan

    device = torch.device(args.device)
    if device.type == "cpu" and len(args.modes) > 1:
        log.warning("on the CPU the peak is the process's largest resident set so far: the later modes include the "
                    "earlier ones' peak; run one --modes value per process to compare")
    folder, _, tmp = shared_xl_folder(args)
    rows = []
    for mode in args.modes:
        run = load_config(Config, "pixart_delta_lcm_1024", [
            f"sample.checkpoint={folder}", f"text_encoder.path={folder}", f"autoencoder.path={folder}",
            f"sample.device={args.device}", f"sample.dtype={args.dtype}", f"text_encoder.dtype={args.dtype}",
            f"autoencoder.dtype={args.dtype}", f"sample.quantize={mode}", "sample.low_memory=true",
            f"sample.width={args.size}", f"sample.height={args.size}", "sample.resolution_binning=false"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with torch.inference_mode():
            generate(run, plan(run, ["a photograph of an astronaut riding a horse on the moon"]), progress=False)
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        rows.append(dict(mode=mode, peak_mb=peak, seconds=seconds))
        log.info("| PixArt-δ LCM 4 steps | %dpx | %s | %s | T5 %d layers | %.0f | %.1f |", args.size, args.dtype, mode,
                 args.t5_layers, peak, seconds)
        emit(args, rows)
    if tmp is not None:
        tmp.cleanup()
    return rows


MEMORY_HEADER = ("| case | image | dtype | quantize | text encoder | peak memory (MB) | s (incl. loading) |\n"
                 "|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    image = f"{r['size']}px" + (f" {r['variant']}" if r.get("variant", "alpha") != "alpha" else "")
    return (f"| {image} | {r['dtype']} | {r['tflop']:.3f} | {r['ours']:.3f} | {r['diffusers']:.3f} "
            f"| {r['ratio']:.2f} | {100 * r['ours_mfu']:.0f}% | {100 * r['diffusers_mfu']:.0f}% "
            f"| {r['peak'] / 1e12:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    tr = sub.add_parser("transformer", help="one forward: ours vs diffusers on the same weights")
    tr.add_argument("--sizes", type=int, nargs="+", default=[256, 512],
                    choices=sorted({*PIXART_PRESETS, *SIGMA_VARIANTS}))
    tr.add_argument("--variant", default="alpha", choices=["alpha", "sigma"],
                    help="sigma: PixArt-Sigma's configuration (300 caption tokens, no micro-conditions)")
    tr.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    tr.add_argument("--arch", default="XL")
    tr.add_argument("--batch", type=int, default=1)
    tr.add_argument("--reps", type=int, default=4, help="timed rounds; the best of each is reported")
    tr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    kv = sub.add_parser("kv", help="PixArt-Sigma's KV compression on half the blocks against none")
    kv.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], choices=sorted(SIGMA_VARIANTS))
    kv.add_argument("--arch", default="XL")
    kv.add_argument("--depth", type=int, help="fewer blocks than the arch's (same tokens and width); default: all")
    kv.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
    kv.add_argument("--batch", type=int, default=1)
    kv.add_argument("--reps", type=int, default=3)
    kv.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    pl = sub.add_parser("pipeline", help="one image end to end: ours vs diffusers.PixArtAlphaPipeline")
    vae_p = sub.add_parser("vae", help="the VAE decoder alone: default vs channels-last vs compiled")
    for q in (pl, vae_p):
        q.add_argument("--size", type=int, default=1024 if torch.cuda.is_available() else 256)
        q.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
        q.add_argument("--arch", default="XL")
        q.add_argument("--t5-layers", type=int, default=24 if torch.cuda.is_available() else 2,
                       help="T5-v1.1-XXL has 24; fewer keep a CPU run short (text encoding then costs less)")
        q.add_argument("--folder", help="the random pipeline folder to use, written there if absent (so several "
                                        "runs share one T5-XXL); default: a temporary folder")
        q.add_argument("--reps", type=int, default=3)
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    vae_p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                       help="also time the compiled decoder")
    pl.add_argument("--cases", nargs="+", default=["lcm4", "dpm14"], choices=sorted(PIPELINE_CASES),
                    help="PixArt-delta LCM 4 steps, PixArt-alpha DPM-Solver 14 / 20 steps (CFG 4.5)")
    pl.add_argument("--variants", nargs="+", default=["float", "compiled"], choices=sorted(PIPELINE_VARIANTS),
                    help="our side: quantisation and torch.compile (compiled: transformer and VAE decoder; -cg: CUDA "
                         "graphs); the first is the float reference of the image columns (diffusers runs in --dtype)")
    pl.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"],
                    help="sample.compile_scope of the compiled variants")
    tn = sub.add_parser("train", help="training-step throughput and peak memory")
    tn.add_argument("--archs", nargs="+", default=["XL", "S"])
    tn.add_argument("--size", type=int, default=256)
    tn.add_argument("--batch", type=int, default=2)
    tn.add_argument("--checkpointing", type=lambda v: v == "on", nargs="+", default=[False, True],
                    metavar="on|off")
    tn.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    tn.add_argument("--compile", action="store_true", help="also time each configuration through torch.compile")
    tn.add_argument("--reps", type=int, default=3)
    tn.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    lc = sub.add_parser("lcd", help="latent consistency distillation step: full vs LoRA, time and peak memory")
    lc.add_argument("--archs", nargs="+", default=["XL"] if torch.cuda.is_available() else ["S"])
    lc.add_argument("--size", type=int, default=1024 if torch.cuda.is_available() else 256,
                    choices=sorted(PIXART_PRESETS))
    lc.add_argument("--batch", type=int, default=12 if torch.cuda.is_available() else 2)
    lc.add_argument("--lora-ranks", type=int, nargs="+", default=[0, 32], help="0: full distillation")
    lc.add_argument("--checkpointing", type=lambda v: v == "on", nargs="+",
                    default=[True] if torch.cuda.is_available() else [False], metavar="on|off")
    lc.add_argument("--dtypes", nargs="+", default=["bf16"] if torch.cuda.is_available() else ["fp32"],
                    choices=sorted(DTYPES))
    lc.add_argument("--dmd", action="store_true",
                    help="time DMD2's two updates (tasks/dmd.py: fake score, generator) instead of the LCD step")
    lc.add_argument("--frozen-dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                    help="train.frozen_dtype: how the teacher (LoRA: the base weights) is stored")
    lc.add_argument("--reps", type=int, default=3)
    lc.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cn = sub.add_parser("control", help="one forward: base alone vs base + ControlNet branch (N, design)")
    cn.add_argument("--arch", default="XL")
    cn.add_argument("--size", type=int, default=1024 if torch.cuda.is_available() else 256,
                    choices=sorted(PIXART_PRESETS))
    cn.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
    cn.add_argument("--batch", type=int, default=1)
    cn.add_argument("--variants", nargs="+", default=["transformer:1", "transformer:13", "unet:14"],
                    help="DESIGN:N")
    cn.add_argument("--reps", type=int, default=3)
    cn.add_argument("--train", action="store_true",
                    help="time a training step (base alone vs base + branch) instead of a sampling forward")
    cn.add_argument("--frozen-dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                    help="--train: how the frozen base is stored (train.frozen_dtype)")
    cn.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    qt = sub.add_parser("quantize", help="one forward in fp32/int8/fp8, eager and compiled, vs diffusers fp32")
    qt.add_argument("--size", type=int, default=512, choices=sorted(PIXART_PRESETS))
    qt.add_argument("--batch", type=int, default=1)
    qt.add_argument("--modes", nargs="+", default=["int8"], choices=["int8", "fp8"])
    qt.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the compiled models (first call compiles, outside the timing)")
    qt.add_argument("--images", action=argparse.BooleanOptionalAction, default=True,
                    help="also compare final images of quantised and fp32 generation")
    qt.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True,
                    help="time the forwards (--no-timing: the image comparison only)")
    qt.add_argument("--reps", type=int, default=3)
    qt.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    mm = sub.add_parser("memory", help="peak memory of one 1024px PixArt-delta image, float vs 8-bit")
    mm.add_argument("--size", type=int, default=1024)
    mm.add_argument("--modes", nargs="+", default=["none", "int8"], choices=["none", "int8", "fp8"])
    mm.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPES))
    mm.add_argument("--t5-layers", type=int, default=24 if torch.cuda.is_available() else 2,
                    help="24: T5-v1.1-XXL's real size (19 GB of random fp32 weights written to a temporary folder)")
    mm.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    mm.add_argument("--folder", help="the random pipeline folder to use, written there if absent (shared with the "
                                     "pipeline benchmark); default: a temporary folder")
    mm.add_argument("--arch", default="XL")
    for q in sub.choices.values():
        q.add_argument("--json", help="also write the rows to this JSON file (updated after each row)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.info("device %s, torch %s, %d threads", args.device, torch.__version__, torch.get_num_threads())
    header, bench = {"memory": (MEMORY_HEADER, bench_memory), "quantize": (QUANTIZE_HEADER, bench_quantize),
                     "transformer": (HEADER, bench_transformer), "kv": (KV_HEADER, bench_kv),
                     "control": (CONTROL_TRAIN_HEADER if getattr(args, "train", False) else CONTROL_HEADER,
                                 bench_control),
                     "lcd": (DMD_HEADER if getattr(args, "dmd", False) else LCD_HEADER,
                             dmd_step_rows if getattr(args, "dmd", False) else bench_lcd),
                     "train": (TRAIN_HEADER, bench_train),
                     "pipeline": (PIPELINE_HEADER, bench_pipeline), "vae": (VAE_HEADER, bench_vae)}[args.what]
    log.info(header)
    rows = bench(args)
    emit(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
