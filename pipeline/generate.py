"""Text-to-image generation: prompts -> T5 features -> a sampler over the transformer -> VAE decoding.

This is orchestration (weights, files, devices) on top of diffusion/ (the maths), which never imports it.

The stages run in the order of the low-memory recipe (encode every prompt, optionally free T5, then load the
transformer), and every check that can fail runs in `plan()` before anything heavy is loaded.
"""

import contextlib
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, replace

import torch
import yaml
from tqdm import tqdm

from common.errors import UserError
from diffusion import NoiseSchedule, get_sampler, sampler_timesteps
from diffusion.denoiser import Denoiser
from diffusion.guidance import classifier_free_guidance, conditional_denoiser, null_caption_pair
from models.aspect_ratios import aspect_ratio_bins, closest_bin, nearest_multiples, resize_and_center_crop
from models.autoencoder import latent_channels_of, load_autoencoder
from models.checkpoint import CheckpointError, load_checkpoint, peek
from models.pixart import PixArt, PixArtBlock, PixArtConfig
from models.text_encoder import load_text_encoder, parse_dtype, resolve_text_encoder
from models.variants import VARIANTS, family_mismatch, variant_for_size
from pipeline.config import SEED_LIMIT, SampleConfig

log = logging.getLogger(__name__)

class SamplingError(UserError):
    """Sampling went wrong in a way the user can act on (NaN/inf latents); the message names the step."""


class FiniteCheck:
    """A sampler callback that stops generation at the first step whose latents are NaN or inf, naming that step.

    On a GPU, reading a flag back each step would make the CPU wait for the GPU after every step; there the flags
    stay on the device and `raise_if_any()` reads them once, after sampling (the message still names the first bad
    step). On the CPU the check is immediate.
    """

    def __init__(self, defer: bool | None = None):
        self.defer = defer  # None: defer on GPUs, check at once on the CPU
        self.pending: list[tuple[tuple[int, int, int], torch.Tensor]] = []  # ((step, total, timestep), finite flag)

    def __call__(self, info) -> None:
        finite = torch.isfinite(info.x).all()
        where = (info.index, info.total, info.timestep)
        if not (self.defer if self.defer is not None else info.x.device.type != "cpu"):
            if not finite:
                raise self.error(*where)
        else:
            self.pending.append((where, finite))

    def raise_if_any(self) -> None:
        """Raise for the first step whose latents were not finite (a no-op on the CPU, which checked at once)."""
        if self.pending:
            where, flags = zip(*self.pending)
            self.pending = []
            bad = (~torch.stack(flags).cpu()).nonzero()  # one device read for every step
            if len(bad):
                raise self.error(*where[int(bad[0])])

    @staticmethod
    def error(index: int, total: int, timestep: int) -> "SamplingError":
        return SamplingError(f"the latents became NaN/inf at step {index + 1} of {total} (timestep {timestep}): "
                             f"the weights may be broken, or half precision overflowed (try --dtype fp32 or bf16)")


@dataclass
class Plan:
    """A checked request: everything needed to generate, resolved before any weights are read."""

    prompts: list[str]      # one entry per image (prompts repeated images_per_prompt times)
    seeds: list[int]        # one per image
    model_cfg: PixArtConfig
    use_file_config: bool   # the checkpoint carries its own config (else the run config's model section is used)
    gen_size: tuple[int, int]  # (height, width) the transformer generates at
    out_size: tuple[int, int]  # (height, width) of the saved images
    control: torch.Tensor | None = None  # control map(s) in [-1, 1] at gen_size, with a control branch: (3, H, W)
                                         # for every image, or (N, 3, H, W) one per image (see with_controls)


def plan(cfg, prompts: list[str]) -> Plan:
    """Validate a run config and prompts without loading weights or creating anything; every error names the fix."""
    s = cfg.sample
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UserError("no prompts (or an empty one): pass --prompt TEXT or --prompts-file FILE (one per line)")
    check_sample_values(s)
    check_sampler_options(s.sampler, s.sampler_options)
    timesteps = sampler_timesteps(s.sampler, s.steps, cfg.diffusion.num_steps, s.sampler_options).tolist()
    check_device(s.device, s.dtype)
    s.quantize = resolve_quantize(s.quantize, s.device)
    if s.checkpoint is None:
        raise UserError("no transformer checkpoint: pass --checkpoint PATH (or set sample.checkpoint)")
    info = peek(s.checkpoint)
    stored = stored_compute_mode(info)
    if stored != "none" and s.quantize not in ("none", stored):
        raise CheckpointError(f"{s.checkpoint} holds {stored} weights already; --quantize {s.quantize} needs the "
                              f"float checkpoint (or drop --quantize to run the {stored} file as it is)")
    model_cfg = file_model_config(info, cfg.model, s.checkpoint)
    check_caption_length(cfg.text_encoder, model_cfg, s.checkpoint)
    check_autoencoder_family(cfg.autoencoder, model_cfg)
    vae_channels = latent_channels_of(cfg.autoencoder)
    if vae_channels != model_cfg.in_channels:
        raise CheckpointError(f"the transformer {s.checkpoint} takes {model_cfg.in_channels}-channel latents but the "
                              f"autoencoder ({cfg.autoencoder.kind}, {cfg.autoencoder.path}) makes {vae_channels}: "
                              f"use the autoencoder the model was trained with")
    check_prediction(info, cfg.diffusion.prediction, s.checkpoint)
    trained = info.metadata.get("generator_timesteps", "")  # a DMD student's export: the timesteps it trained at
    drawn = ",".join(map(str, timesteps))
    if s.sampler == "lcm" and trained and trained.count(",") + 1 == s.steps and trained != drawn:
        log.warning("%s was trained as a %d-step generator at timesteps %s but is sampled at %s: set "
                    "sample.sampler_options to {timesteps: [%s]} (its preset config does)", s.checkpoint, s.steps,
                    trained, drawn, trained)
    if s.sampler == "lcm" and model_cfg.guided_by_cfg(s.guidance) and info.metadata.get("teacher"):
        log.warning("guidance %g with the LCM sampler on a distilled student: the teacher's guidance is distilled "
                    "into it, so more guidance on top over-saturates and degrades the image; use guidance 0",
                    s.guidance)
    text_width = text_encoder_width(cfg.text_encoder.path)
    if text_width != model_cfg.caption_channels:
        raise CheckpointError(f"the text encoder {cfg.text_encoder.path} makes {text_width}-dim features but the "
                              f"transformer {s.checkpoint} expects caption_channels={model_cfg.caption_channels}: "
                              f"use the text encoder the model was trained with")
    if model_cfg.guided_by_cfg(s.guidance) and s.uncond == "null" and info.null_caption is False:
        raise CheckpointError(f"{s.checkpoint} has no learned null caption (a plain diffusers folder), so guidance "
                              f'with the null caption is impossible: pass --negative-prompt "" (diffusers-style '
                              f"guidance), or --guidance 1 to turn guidance off")
    gen_size, out_size = resolve_size(s, model_cfg, downsample=1 if cfg.autoencoder.kind == "pixel" else 8)
    too_big = variant_for_size(model_cfg, *out_size)  # binning would draw at the base size and stretch it
    if too_big:
        raise UserError(too_big)
    prompts = [p for p in prompts for _ in range(s.images_per_prompt)]
    if s.seed + len(prompts) > SEED_LIMIT:
        raise UserError(f"sample.seed {s.seed} + {len(prompts)} images exceeds the largest seed {SEED_LIMIT}")
    control = plan_control(cfg, model_cfg, gen_size)
    if control is not None and stored != "none":
        raise CheckpointError(int8_base_message(s.checkpoint, stored))
    return Plan(prompts, [s.seed + i for i in range(len(prompts))], model_cfg.resolved(), info.config is not None,
                gen_size, out_size, control)


def file_model_config(info, run_model: PixArtConfig, path) -> PixArtConfig:
    """The architecture a checkpoint declares (else the run config's), checked against the run config's family: a
    PixArt-Sigma file with an alpha preset, or the reverse, is refused here, naming the preset to use. A file that
    does not say its caption length (a lone diffusers transformer folder) takes the run config's, and a file that
    names no variant takes the run config's when the two describe the same network."""
    seen = dict(info.seen)
    if info.config is not None and info.caption_tokens_known:
        for key in ("caption_tokens", "micro_conditions", "latent_size", "pe_interpolation"):
            seen.setdefault(key, getattr(info.config, key))
    mismatch = family_mismatch(run_model, seen)
    if mismatch:
        raise CheckpointError(f"{path}: {mismatch}")
    model_cfg = info.config or run_model
    if not info.caption_tokens_known:
        model_cfg = replace(model_cfg, caption_tokens=run_model.caption_tokens)
    if not model_cfg.variant and run_model.variant:
        same = ("caption_tokens", "latent_size", "pe_interpolation", "micro_conditions")
        if all(getattr(model_cfg, k) == getattr(run_model, k) for k in same):
            model_cfg = replace(model_cfg, variant=run_model.variant)
    return model_cfg


def check_caption_length(text_encoder, model_cfg: PixArtConfig, path) -> None:
    """The text encoder pads captions to the model's caption length: the one check that the two agree, made before
    T5 loads (a mismatch would otherwise surface as a shape error at the first guided step)."""
    if text_encoder.max_tokens != model_cfg.caption_tokens:
        family = model_cfg.family
        raise UserError(
            f"the text encoder pads captions to text_encoder.max_tokens={text_encoder.max_tokens} tokens but the "
            f"transformer {path} takes {model_cfg.caption_tokens}-token captions ({family.title}: "
            f"{family.caption_tokens}): --set text_encoder.max_tokens={model_cfg.caption_tokens}, or use the preset "
            f"of the model's variant")


def check_autoencoder_family(ae, model_cfg: PixArtConfig) -> None:
    """A model of a named variant samples through its family's VAE: PixArt-Sigma's latents are the SDXL VAE's, which
    the SD VAE decodes into noise. The VAE is recognised by the scaling factor in its config.json."""
    if ae.kind != "sd-vae" or model_cfg.variant not in VARIANTS or ae.scale is not None:
        return
    from models.autoencoder import resolve_vae

    scale = resolve_vae(ae.path)[1].get("scaling_factor")
    want = model_cfg.family.vae
    if scale is not None and abs(float(scale) - want.scaling_factor) > 1e-6:
        raise UserError(f"{model_cfg.family.title} ({model_cfg.variant}) was trained on {want.name} (scaling factor "
                        f"{want.scaling_factor}), but autoencoder.path {ae.path} has scaling factor {scale}: point "
                        f"autoencoder.path at {want.name} ({want.get}), or set autoencoder.scale to force it")


def plan_control(cfg, model_cfg: PixArtConfig, gen_size: tuple[int, int]) -> torch.Tensor | None:
    """The control map of a request, checked with its branch options (before any weights load)."""

    from data.control_maps import control_map
    from data.folder import load_image

    s = cfg.sample
    if s.control is None:  # a config may name a default branch; it is used only with a control image
        return None
    check_control_branch(cfg, model_cfg)
    return control_map(load_image(s.control), s.control_type, gen_size, s.strict_control, name=f"--control {s.control}",
                       hed_weights=s.hed_weights)


def check_control_branch(cfg, model_cfg: PixArtConfig) -> None:
    """control.checkpoint exists and fits the base's depth; its design and N (from the file) go into cfg.control."""

    from models.controlnet import ControlError, branch_design

    cc = cfg.control
    if not cc.checkpoint:
        raise ControlError("a control image needs a ControlNet branch: pass --control-checkpoint FILE (or set "
                           "control.checkpoint)")
    cc.design, cc.num_blocks = branch_design(cc.checkpoint)  # a branch file carries its design, like a checkpoint
    cc.check(model_cfg.dims()[0])


def with_controls(cfg, request: Plan, maps: torch.Tensor) -> Plan:
    """The request with one control map per image: maps (N, 3, H, W) in [-1, 1] at the generated size."""
    check_control_branch(cfg, request.model_cfg)
    if maps.ndim != 4 or len(maps) != len(request.prompts) or tuple(maps.shape[-2:]) != request.gen_size:
        raise UserError(f"expected {len(request.prompts)} control maps of size {request.gen_size}, got "
                        f"{tuple(maps.shape)}")
    return replace(request, control=maps)




def check_sample_values(s: SampleConfig) -> None:
    """The sample section's own checks (SampleConfig.validate), again after command-line flags changed it."""
    s.validate()


def check_device(device: str, dtype: str) -> None:
    """A device torch knows and this machine has."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this machine has no CUDA GPU (or torch was built without CUDA); "
                            f"use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: there are {torch.cuda.device_count()} GPUs (cuda:0.."
                            f"cuda:{torch.cuda.device_count() - 1})")
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: sampling runs on cpu or cuda, not {dev.type}")


def stored_compute_mode(info) -> str:
    """How a checkpoint file's weights compute once loaded: "int8" for an int8 file, "none" for float weights
    (an int8-weights file is stored in int8 and computes in float; models/quantize.py)."""
    from models.quantize import COMPUTE_MODE

    mode = info.metadata.get("quantization", "none")
    return COMPUTE_MODE.get(mode, mode)  # an unknown mode is refused when the file loads


def int8_base_message(path, stored: str) -> str:
    return (f"{path} holds {stored} weights, but a ControlNet branch starts as a copy of its base's blocks in float: "
            f"pass the float checkpoint with --quantize {stored} (base and branch are then quantised together)")


def resolve_quantize(mode: str, device: str) -> str:
    from models.quantize import resolve_mode

    return resolve_mode(mode, device)


def check_prediction(info, prediction: str, path) -> None:
    """A checkpoint exported by this project's trainers records its run config: its prediction type must match."""
    text = info.metadata.get("config")
    if not text:
        return
    trained = ((yaml.safe_load(text) or {}).get("diffusion") or {}).get("prediction", "eps")
    if trained != prediction:
        raise CheckpointError(f"{path} was trained to predict {trained!r} but the config says diffusion.prediction="
                              f"{prediction!r}: sampling would give noise; use --set diffusion.prediction={trained}")


def text_encoder_width(path: str) -> int:
    """d_model of the T5 a text-encoder path names, from its config.json alone."""
    model_dir, _ = resolve_text_encoder(path)
    return int(json.loads((model_dir / "config.json").read_text())["d_model"])


def check_sampler_options(name: str, options: dict) -> None:
    """Reject sampler_options the sampler does not take, naming the ones it does."""
    params = inspect.signature(get_sampler(name)).parameters
    valid = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in ("generator", "callback")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"sample.sampler_options {unknown} are not options of sampler {name!r}; "
                         f"valid: {', '.join(valid) or 'none'}")


def size_for_aspect_ratio(text: str, base: int) -> tuple[int, int]:
    """'16:9' -> (width, height) with width / height = 16 / 9 and about base^2 pixels."""
    try:
        w, h = (float(v) for v in text.split(":"))
        assert w > 0 and h > 0
    except (ValueError, AssertionError):
        raise UserError(f"aspect ratio {text!r}: expected W:H with positive numbers, e.g. 16:9") from None
    return round(base * math.sqrt(w / h)), round(base / math.sqrt(w / h))


def resolve_size(s: SampleConfig, model_cfg: PixArtConfig, downsample: int) -> tuple[tuple, tuple]:
    """(generation size, output size) as (height, width) pixels; an invalid size without binning is an error."""
    base = model_cfg.latent_size * downsample
    stride = model_cfg.kv_compress_stride if model_cfg.kv_compress_blocks else 1  # KV compression's token cells
    default_w, default_h = size_for_aspect_ratio(s.aspect_ratio, base) if s.aspect_ratio else (base, base)
    height, width = s.height or default_h, s.width or default_w
    multiple = downsample * model_cfg.patch_size * stride
    if s.resolution_binning:
        _, gen = closest_bin(height, width, aspect_ratio_bins(base, multiple))
        return gen, (height, width)
    if height % multiple or width % multiple:
        raise UserError(f"image size {width}x{height} (width x height) is not a multiple of {multiple} "
                         f"(autoencoder downsampling {downsample} x patch {model_cfg.patch_size}"
                         f"{f' x KV-compression stride {stride}' if stride > 1 else ''}): nearest valid "
                         f"widths {nearest_multiples(width, multiple)}, heights {nearest_multiples(height, multiple)}; "
                         f"or turn resolution_binning on")
    return (height, width), (height, width)


@dataclass
class Timings:
    """Seconds per stage; with per_forward, also the time inside the transformer's own forwards (timing those needs
    a device synchronisation around each forward, which a GPU run otherwise avoids)."""

    text_encoding: float = 0.0
    loading: float = 0.0
    denoising: float = 0.0
    transformer_forwards: float = 0.0
    vae_decoding: float = 0.0
    per_forward: bool = False


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eps_model(model: PixArt, schedule: NoiseSchedule, prediction: str = "eps", timings: Timings | None = None):
    """The transformer as eps(x, t, **conditions): a noise estimate whatever it predicts (diffusion/denoiser.py),
    each forward timed into `timings` when it asks for per-forward times."""
    device = next(model.parameters()).device

    def forward(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if timings is None or not timings.per_forward:
            return model(x, t, **cond)
        _sync(device)
        start = time.perf_counter()
        out = model(x, t, **cond)
        _sync(device)
        timings.transformer_forwards += time.perf_counter() - start
        return out

    return Denoiser(forward, schedule, prediction).eps


def initial_noise(seeds: list[int], shape: tuple[int, int, int], device, dtype) -> torch.Tensor:
    """(N, C, h, w) standard normal latents, image i drawn from its own seed (so batching does not change it)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.stack(noise).to(device, dtype)


def guided_denoiser(model: PixArt, schedule: NoiseSchedule, s: SampleConfig, cond: dict, *,
                    negative: dict | None = None, prediction: str = "eps", timings: Timings | None = None):
    """The sampler's denoise(x, t) -> eps for a batch of conditions, with the guidance `s` asks for: the guidance
    embedding of an LCM student that takes w, none (s.guidance <= 1), or CFG against the learned null caption or
    the negative prompt's features (`negative`, used when s.uncond is "negative")."""
    fn = eps_model(model, schedule, prediction, timings)
    if getattr(model, "guidance_embedding", False):  # an LCM student that takes w as input: no CFG
        n = cond["y"].shape[0]
        cond = {**cond, "guidance": torch.full((n,), max(float(s.guidance), 0.0), device=cond["y"].device)}
        return conditional_denoiser(fn, cond)
    if s.guidance <= 1.0:
        return conditional_denoiser(fn, cond)
    if s.uncond == "null":
        return classifier_free_guidance(fn, *null_caption_pair(cond), s.guidance)
    uncond = {**cond, "y": negative["y"].to(cond["y"].dtype).expand_as(cond["y"]),
              "mask": negative["mask"].expand_as(cond["mask"])}
    return classifier_free_guidance(fn, cond, uncond, s.guidance)


def conditions_in_dtype(cond: dict, dtype: torch.dtype) -> dict:
    """The batch's conditions with every floating-point tensor in the network's dtype (masks and flags as they are)."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}


def denoise_batch(model: PixArt, schedule: NoiseSchedule, s: SampleConfig, cond: dict, seeds: list[int], latent_hw,
                  *, negative: dict | None = None, prediction: str = "eps", timings: Timings | None = None,
                  on_step=None) -> torch.Tensor:
    """Latents (N, C, h, w) for one batch: noise from the seeds, guidance as configured, the chosen sampler.

    cond holds every condition of the model for the batch, each batched (N, ...): y (N, L, D) and mask (N, L) of
    the prompts' T5 features, micro-conditions, a control latent, ... (one mapping, so a new condition is a new key).
    negative = {"y": (1, L, D), "mask": (1, L)}: the negative prompt's features, used when s.uncond is "negative";
    prediction is what the network outputs (eps, v or x0).
    """
    dtype = next(model.parameters()).dtype
    device = cond["y"].device
    x = initial_noise(seeds, (model.in_channels, *latent_hw), device, dtype)  # (N, C, h, w)
    cond = conditions_in_dtype(cond, dtype)
    denoise = guided_denoiser(model, schedule, s, cond, negative=negative, prediction=prediction, timings=timings)
    # Fresh noise of stochastic samplers (LCM, DDIM eta > 0): one generator per image, so batching changes nothing.
    generators = [torch.Generator().manual_seed(seed + 1_000_003) for seed in seeds]
    return get_sampler(s.sampler)(denoise, x, schedule, s.steps, generator=generators, callback=on_step,
                                  **s.sampler_options)


@torch.no_grad()
def preview_images(model, vae, schedule: NoiseSchedule, s: SampleConfig, cond: dict, latent_hw,
                   prediction: str = "eps") -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for one batch of cached conditions: the trainers' sample grids. Image i uses
    seed s.seed + i; guidance (if any) uses the learned null caption. Leaves the model in eval mode."""
    seeds = [s.seed + i for i in range(len(cond["y"]))]
    latents = denoise_batch(model.eval(), schedule, replace(s, uncond="null"), cond, seeds, tuple(latent_hw),
                            prediction=prediction)
    return ((vae.decode(latents).float() + 1) / 2).clamp(0, 1)


def micro_conditions(model_cfg: PixArtConfig, gen_size, n: int, device, dtype) -> dict:
    """Image size (height, width) and aspect ratio (height / width) of the generation, for MS models."""
    if not model_cfg.micro_conditions:
        return {}
    h, w = gen_size
    return {"resolution": torch.tensor([[float(h), float(w)]] * n, device=device, dtype=dtype),
            "aspect_ratio": torch.tensor([[h / w]] * n, device=device, dtype=dtype)}


@dataclass
class Generated:
    """Images in [0, 1] (N, 3, H, W) on the CPU, with what made each of them."""

    images: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    timings: Timings


@dataclass
class PromptFeatures:
    """T5 features of every distinct prompt of a request (and of the negative prompt)."""

    features: torch.Tensor                 # (P, L, D)
    masks: torch.Tensor                    # (P, L)
    index: dict[str, int]                  # prompt -> row
    negative: dict | None                  # {"y": (1, L, D), "mask": (1, L)} when uncond is "negative"

    def rows(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([self.index[p] for p in prompts], device=self.features.device)
        return self.features[idx], self.masks[idx]


def encode_prompts(text_encoder, s: SampleConfig, prompts: list[str], caption_channels: int) -> PromptFeatures:
    """Encode each distinct prompt once (plus the negative prompt when it is the unconditional input)."""
    if text_encoder.feature_dim != caption_channels:
        raise CheckpointError(f"the text encoder makes {text_encoder.feature_dim}-dim features but the transformer "
                              f"expects caption_channels={caption_channels}: use the text encoder the model was "
                              f"trained with")
    unique = list(dict.fromkeys(prompts + ([s.negative_prompt] if s.uncond == "negative" else [])))
    features, masks = text_encoder.encode(unique)
    index = {p: i for i, p in enumerate(unique)}
    negative = None
    if s.uncond == "negative":
        i = index[s.negative_prompt]
        negative = {"y": features[i:i + 1], "mask": masks[i:i + 1]}
    return PromptFeatures(features, masks, index, negative)


def text_encoder_config(cfg):
    """The text encoder section, with int8 weights for --low-memory and --quantize."""
    s = cfg.sample
    return replace(cfg.text_encoder, load_in_8bit=True) if s.low_memory or s.quantize != "none" else cfg.text_encoder


def load_denoiser(cfg, request: Plan) -> PixArt:
    """The transformer of a request, on the sample device and dtype, checked against the guidance mode."""
    s = cfg.sample
    dtype = parse_dtype(s.dtype, "sample.dtype")
    if s.quantize != "none":
        from models.quantize import compute_dtype

        dtype = compute_dtype(s.quantize, s.device, dtype)
    model, _, report = load_checkpoint(s.checkpoint, None if request.use_file_config else cfg.model,
                                       device=s.device, dtype=dtype)
    if model.cfg.guided_by_cfg(s.guidance) and s.uncond == "null" and not report.null_caption:
        raise CheckpointError(f"{s.checkpoint} has no learned null caption, so guidance with the null caption is "
                              f'impossible: pass --negative-prompt "" (diffusers-style guidance), or --guidance 1 to '
                              f"turn guidance off")
    if request.control is not None:  # the base steered by its control branch (checked against the base's hash)
        from models.controlnet import ControlledPixArt, load_branch
        from models.shipped import content_hash

        branch = load_branch(cfg.control.checkpoint, model, cfg.control, content_hash(s.checkpoint))
        branch = branch.to(device=s.device, dtype=next(model.parameters()).dtype)
        model = ControlledPixArt(model, branch).eval()
    if s.quantize != "none":  # the block linears still in float (all of them, or a branch beside an int8 file)
        from models.quantize import quantize_transformer

        quantize_transformer(model, s.quantize)
    if s.compile:
        model = compile_denoiser(model, s)
    return model


def compile_denoiser(model, s: SampleConfig):
    """The transformer (and its ControlNet branch) through torch.compile as s.compile_scope and s.compile_mode say:
    "blocks" compiles every transformer block (the base's and the branch's copies) in place, which takes seconds and
    keeps nearly all of the speed; "model" compiles the whole forward as one graph."""
    from models.compiled import compile_module

    if torch.device(s.device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolution (VAE) once
    regions = [m for m in model.modules() if isinstance(m, PixArtBlock)] if s.compile_scope == "blocks" else None
    return compile_module(model, "the transformer", s.device, regions=regions, mode=s.compile_mode)


SMALL_FORWARD_MACS = 5e8  # below this many multiply-adds per transformer forward, one CPU thread is faster


def forward_macs(model_cfg: PixArtConfig, gen_size: tuple[int, int], downsample: int, batch: int) -> float:
    """About the multiply-adds of one transformer forward: 14 D^2 per token and block (attention, cross-attention
    projections, MLP), caption attention and embedders left out."""
    depth, hidden, _ = model_cfg.dims()
    tokens = (gen_size[0] // downsample // model_cfg.patch_size) * (gen_size[1] // downsample // model_cfg.patch_size)
    return batch * tokens * depth * 14 * hidden**2


@contextlib.contextmanager
def cpu_threads_for(device: torch.device, macs: float):
    """One intra-op thread on the CPU for forwards too small to split: their matrix products take a fraction of a
    millisecond, and a second OpenMP thread on a core that other processes keep busy makes each wait ~16 ms (the
    shipped 32x32 models' 4 steps: 3 s instead of 0.03 s). Larger forwards keep PyTorch's thread count."""
    if device.type != "cpu" or macs >= SMALL_FORWARD_MACS or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sample_images(model: PixArt, vae, schedule: NoiseSchedule, s: SampleConfig, request: Plan,
                  prompts: PromptFeatures, timings: Timings, progress: bool = True,
                  prediction: str = "eps", control_scale: float = 1.0, on_batch=None) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] on the CPU for every prompt/seed of the request, in batches of s.batch_size;
    on_batch(images (n, 3, H, W), first index) sees each batch as it finishes (to save it before the next)."""
    device = torch.device(s.device)
    latent_hw = (request.gen_size[0] // vae.downsample, request.gen_size[1] // vae.downsample)
    shared = None
    if request.control is not None and request.control.ndim == 3:  # one map for every image: encoded once
        with torch.inference_mode():
            shared = vae.encode(request.control[None].to(device), sample=False).float()  # (1, C, h, w)
    bar = tqdm(total=len(request.prompts) * s.steps, desc="denoising", unit="step", disable=not progress)
    finite = FiniteCheck()
    images = []
    for b in range(0, len(request.prompts), s.batch_size):
        batch, seeds = request.prompts[b:b + s.batch_size], request.seeds[b:b + s.batch_size]
        y, mask = prompts.rows(batch)
        cond = {"y": y, "mask": mask,
                **micro_conditions(request.model_cfg, request.gen_size, len(batch), device, torch.float32)}
        if request.control is not None:  # by the image's own autoencoder (the posterior mean, as in training)
            with torch.inference_mode():
                latent = shared if shared is not None else vae.encode(
                    request.control[b:b + len(batch)].to(device), sample=False).float()
            cond.update(control=latent.expand(len(batch), -1, -1, -1), control_scale=control_scale)
        guided = 2 if request.model_cfg.guided_by_cfg(s.guidance) else 1
        macs = forward_macs(request.model_cfg, request.gen_size, vae.downsample, guided * len(batch))
        with torch.inference_mode(), cpu_threads_for(device, macs):
            start = time.perf_counter()
            latents = denoise_batch(model, schedule, s, cond, seeds, latent_hw, negative=prompts.negative,
                                    prediction=prediction, timings=timings,
                                    on_step=lambda info: (finite(info), bar.update(len(info.x))))
            finite.raise_if_any()
            _sync(device)
            timings.denoising += time.perf_counter() - start
            start = time.perf_counter()
            chunks = latents.split(1) if s.low_memory else [latents]  # VAE activations dominate memory at 1024 px
            decoded = torch.cat([vae.decode(z).float() for z in chunks])  # (n, 3, H, W)
            decoded = resize_and_center_crop(decoded, *request.out_size)
            _sync(device)
            timings.vae_decoding += time.perf_counter() - start
        images.append(((decoded + 1) / 2).clamp(0, 1).cpu())  # [-1, 1] -> [0, 1]
        if on_batch is not None:
            on_batch(images[-1], b)
    bar.close()
    return torch.cat(images)


def generate(cfg, request: Plan, progress: bool = True, on_batch=None) -> Generated:
    """Run a planned request: encode every prompt, free T5, then load the transformer and VAE and sample.

    T5-XXL (4.7B parameters) and the transformer are never in memory together. on_batch(images, first index) sees
    each batch of images as soon as it is decoded (sample/sample.py saves it, so an interrupted run keeps it).
    """
    s = cfg.sample
    timings = Timings()
    start = time.perf_counter()
    text_encoder = load_text_encoder(text_encoder_config(cfg), s.device)
    prompts = encode_prompts(text_encoder, s, request.prompts, request.model_cfg.caption_channels)
    _sync(torch.device(s.device))
    timings.text_encoding = time.perf_counter() - start
    text_encoder.unload()
    del text_encoder
    start = time.perf_counter()
    model = load_denoiser(cfg, request)
    vae = load_autoencoder(cfg.autoencoder, s.device)
    if s.compile:
        vae.compile(channels_last=torch.device(s.device).type == "cuda")
    timings.loading = time.perf_counter() - start
    images = sample_images(model, vae, cfg.diffusion.build(), s, request, prompts, timings, progress,
                           cfg.diffusion.prediction, cfg.control.scale, on_batch)
    return Generated(images, request.prompts, request.seeds, timings)
