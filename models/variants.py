"""Model variants: one description per released PixArt model, the one place a variant lives.

A variant (PixArt-alpha 256 / 512 / 1024-MS, PixArt-Sigma 512 / 1024-MS / 2K, the PixArt-delta LCM student) is a
`ModelVariant`: the architecture fields that make it (`PixArtConfig`), its family's caption length, VAE and
diffusers pipeline class, the file formats that can hold it, its preset in configs/ and its detection rule (what
its weights look like). Everything that used to special-case a variant asks this module instead:

    variant = VARIANTS["sigma-1024-ms"]
    cfg = variant.config()                      # PixArtConfig with the variant's architecture
    variant.family.caption_tokens               # 300: the text encoder's max_tokens must agree (sample plan)
    detect_variants(infer_config(state_dict))   # which variants these weights fit (checkpoint diagnosis)

Reading a config imports this module, so it imports no torch.
"""

from dataclasses import asdict, dataclass, field
from typing import Literal

from common.errors import UserError

# Size presets: (depth, hidden_size, num_heads). Patch size is a separate field of PixArtConfig.
PIXART_ARCHS = {
    "XL": (28, 1152, 16),  # the paper's model: 611,349,152 parameters as 1024-MS
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "T": (6, 288, 4),  # tiny (head width 72 like XL; divisible by 3 for micro-conditions): a laptop CPU trains it
}


@dataclass(frozen=True)
class VAE:
    """The autoencoder a family was trained with. The latent scale is read from the VAE's own config.json
    (models/autoencoder.py); the value here is what that config should say, for a check before sampling."""

    name: str
    scaling_factor: float
    get: str  # where to find it (nothing is downloaded by this codebase)


SD_VAE = VAE("the SD VAE (sd-vae-ft-ema)", 0.18215, "hf download PixArt-alpha/PixArt-XL-2-1024-MS --include 'vae/*'")
SDXL_VAE = VAE("the SDXL VAE", 0.13025,
               "hf download PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers --include 'vae/*' 'text_encoder/*' "
               "'tokenizer/*'")


@dataclass(frozen=True)
class Family:
    """What the variants of one paper share: captions, autoencoder, the diffusers pipeline class."""

    name: str                 # alpha | sigma
    title: str                # for messages
    caption_tokens: int       # T5 tokens per caption = length of the learned null caption (y_embedding)
    vae: VAE
    diffusers_pipeline: str   # model_index.json "_class_name" of its diffusers pipeline folders


ALPHA = Family("alpha", "PixArt-alpha", 120, SD_VAE, "PixArtAlphaPipeline")
SIGMA = Family("sigma", "PixArt-Sigma", 300, SDXL_VAE, "PixArtSigmaPipeline")
FAMILIES = {f.name: f for f in (ALPHA, SIGMA)}


@dataclass(frozen=True)
class ModelVariant:
    """One released model: its family, base image size, architecture fields, preset and the formats that hold it."""

    name: str                 # registry key, also `model.variant` in configs
    family: Family
    preset: str               # configs/<preset>.yaml samples or trains it
    image_size: int           # base side in pixels (the positional grid's size)
    model: dict               # PixArtConfig fields besides caption_tokens (from the family) and variant
    formats: tuple[str, ...] = ("official", "diffusers", "safetensors")  # file formats that can hold its weights

    def fields(self) -> dict:
        """PixArtConfig fields of this variant (as a YAML model section would give them)."""
        return {"arch": "XL", "patch_size": 2, **self.model, "caption_tokens": self.family.caption_tokens,
                "variant": self.name}

    def config(self, **overrides) -> "PixArtConfig":
        return PixArtConfig(**{**self.fields(), **overrides})

    @property
    def max_image_side(self) -> int:
        """The largest side a request may ask for: twice the trained side (positional interpolation stretches the
        grid; far beyond it the model draws repeated, broken content)."""
        return 2 * self.image_size


def _variants(*variants: ModelVariant) -> dict[str, ModelVariant]:
    return {v.name: v for v in variants}


VARIANTS = _variants(
    # PixArt-alpha (official configs PixArt_xl2_img{256,512}_internal, _img1024_internalms)
    ModelVariant("alpha-256", ALPHA, "pixart_xl2_256", 256,
                 {"latent_size": 32, "pe_interpolation": 0.5, "micro_conditions": False}),
    ModelVariant("alpha-512", ALPHA, "pixart_xl2_512", 512,
                 {"latent_size": 64, "pe_interpolation": 1.0, "micro_conditions": False}),
    ModelVariant("alpha-1024-ms", ALPHA, "pixart_xl2_1024_ms", 1024,
                 {"latent_size": 128, "pe_interpolation": 2.0, "micro_conditions": True}),
    # PixArt-delta: the LCM student of the 1024-MS model (same network; 4 LCM steps, guidance distilled in)
    ModelVariant("delta-lcm-1024", ALPHA, "pixart_delta_lcm_1024", 1024,
                 {"latent_size": 128, "pe_interpolation": 2.0, "micro_conditions": True}),
    # PixArt-Sigma (official configs PixArt_sigma_xl2_img{512,1024,2K}_internalms*): PixArtMS without
    # micro-conditions, 300-token captions, the SDXL VAE, positional scale image_size / 512.
    ModelVariant("sigma-512", SIGMA, "pixart_sigma_512", 512,
                 {"latent_size": 64, "pe_interpolation": 1.0, "micro_conditions": False}),
    ModelVariant("sigma-1024-ms", SIGMA, "pixart_sigma_1024", 1024,
                 {"latent_size": 128, "pe_interpolation": 2.0, "micro_conditions": False}),
    ModelVariant("sigma-2k", SIGMA, "pixart_sigma_2k", 2048,
                 {"latent_size": 256, "pe_interpolation": 4.0, "micro_conditions": False}),
)

VariantName = Literal[tuple(VARIANTS)]  # noqa: F821 (a Literal of the registry's names, checked by the config loader)


@dataclass
class PixArtConfig:
    """Architecture of a PixArt transformer; stored in every checkpoint this project writes."""

    variant: VariantName | None = None  # a name in models/variants.py: its fields are this section's defaults
    arch: str = "XL"                 # size preset in PIXART_ARCHS; depth/hidden_size/num_heads override it
    depth: int | None = None         # number of transformer blocks
    hidden_size: int | None = None   # token width D
    num_heads: int | None = None     # attention heads (head dim = D / heads)
    patch_size: int = 2              # latent pixels per token side
    mlp_ratio: float = 4.0           # MLP width / D
    in_channels: int = 4             # latent channels (4 for the SD and SDXL VAEs)
    learn_sigma: bool = True         # also predict the variance interpolation (output 2 x in_channels)
    caption_channels: int = 4096     # text-encoder feature width (T5-v1.1-XXL: 4096)
    caption_tokens: int = 120        # length of the learned null caption (y_embedding): alpha 120, Sigma 300
    latent_size: int = 32            # latent side the positional grid is defined for (image side / 8)
    pe_interpolation: float = 0.5    # positional-embedding scale: image side / 512 (0.5 at 256px ... 4 at 2K)
    micro_conditions: bool = False   # image-size and aspect-ratio embedders (the alpha 1024-MS model)
    guidance_embedding: bool = False # LCM-style guidance-scale input w (a distilled student; not in diffusers)
    kv_compress_blocks: list[int] = field(default_factory=list)  # blocks whose self-attention keys and values come
                                     # from the token grid downsampled (Sigma's KV compression; official 1024
                                     # kvcompress config: blocks 14..27); empty: none
    kv_compress_stride: int = 2      # the downsampling's kernel and stride: stride^2 times fewer keys and values
    kv_compress_norm: bool = True    # LayerNorm after the strided conv, as the official code; false: the paper's
                                     # plain average (a fresh layer then equals attention on cell means)

    def dims(self) -> tuple[int, int, int]:
        """(depth, hidden_size, num_heads) after applying overrides to the preset."""
        if self.arch not in PIXART_ARCHS:
            raise UserError(f"unknown model.arch {self.arch!r}; valid: {', '.join(PIXART_ARCHS)}")
        preset = PIXART_ARCHS[self.arch]
        given = (self.depth, self.hidden_size, self.num_heads)
        return tuple(p if g is None else g for p, g in zip(preset, given))

    def resolved(self) -> "PixArtConfig":
        """Copy with depth/hidden_size/num_heads filled in, as written into checkpoints."""
        depth, hidden, heads = self.dims()
        return PixArtConfig(**{**asdict(self), "depth": depth, "hidden_size": hidden, "num_heads": heads})

    def validate(self) -> None:
        """Values that would fail later, deep inside a forward; called by the config loader."""
        depth, hidden, heads = self.dims()
        if hidden % heads:
            raise UserError(f"model.hidden_size {hidden} is not divisible by model.num_heads {heads}")
        if self.micro_conditions and hidden % 3:
            raise UserError(f"micro-conditions split hidden_size into thirds; {hidden} is not divisible by 3")
        bad = [b for b in self.kv_compress_blocks if not 0 <= b < depth]
        if bad:
            raise UserError(f"model.kv_compress_blocks {bad} are not blocks of this {depth}-block model "
                            f"(valid: 0..{depth - 1})")
        if self.kv_compress_blocks and self.kv_compress_stride < 2:
            raise UserError(f"model.kv_compress_stride must be >= 2 when blocks are compressed, got "
                            f"{self.kv_compress_stride}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def family(self) -> Family:
        """The family of the named variant, else the one whose caption length this config has (alpha otherwise)."""
        if self.variant in VARIANTS:
            return VARIANTS[self.variant].family
        return next((f for f in FAMILIES.values() if f.caption_tokens == self.caption_tokens), ALPHA)

    def guided_by_cfg(self, scale: float) -> bool:
        """Whether sampling at guidance `scale` runs classifier-free guidance (two forwards per step): a student
        with a guidance embedding takes w as an input instead."""
        return scale > 1.0 and not self.guidance_embedding

    @classmethod
    def config_defaults(cls, data: dict) -> dict:
        """The config loader's hook: a `variant:` key makes that variant's fields the defaults of this section."""
        name = data.get("variant")
        return VARIANTS[name].fields() if name in VARIANTS else {}


# ----------------------------------------------------------------------------------------------------------
# Detection: which variants a set of weights fits


def detect_variants(seen: dict) -> list[ModelVariant]:
    """Variants that weights fit, from what they show (`seen`: models.checkpoint.infer_config's fields). The family
    is read off the null caption: a (300, 4096) y_embedding without csize/ar embedders is Sigma, 120 tokens alpha;
    a stored pos_embed (latent_size, pe_interpolation) and the micro-condition embedders narrow it to variants of
    that family, and when they fit none (a resized model) every variant of the family is returned."""
    family = next((f for f in FAMILIES.values() if f.caption_tokens == seen.get("caption_tokens")), None)
    if family is None or (family is SIGMA and seen.get("micro_conditions")):
        return []
    ours = [v for v in VARIANTS.values() if v.family is family and not v.name.startswith("delta")]
    keys = ("micro_conditions", "latent_size", "pe_interpolation")
    exact = [v for v in ours if all(seen.get(k, v.fields()[k]) == v.fields()[k] for k in keys)]
    return exact or ours


def presets_for(variants: list[ModelVariant]) -> str:
    """'pixart_sigma_512, pixart_sigma_1024 or pixart_sigma_2k' for messages."""
    names = [v.preset for v in variants]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def family_mismatch(cfg: PixArtConfig, seen: dict) -> str | None:
    """A message when weights belong to another family than the config (a Sigma file with an alpha preset, or the
    reverse), naming the preset to use; None when the families agree or the weights do not say."""
    fits = detect_variants(seen)
    if not fits or "caption_tokens" not in seen:
        return None
    theirs = fits[0].family
    if theirs == cfg.family:
        return None
    why = {SIGMA: f"{SIGMA.caption_tokens} caption tokens, no micro-condition embedders",
           ALPHA: f"{ALPHA.caption_tokens} caption tokens"}[theirs]
    return (f"this is a {theirs.title} checkpoint ({why}) but the config is {cfg.family.title} "
            f"({cfg.caption_tokens} caption tokens): use --config {presets_for(fits)}")


def variant_for_size(cfg: PixArtConfig, height: int, width: int) -> str | None:
    """A message when an image of height x width pixels is beyond what the config's variant was trained for,
    naming the preset to use; None when it is fine (or the config names no variant)."""
    if cfg.variant not in VARIANTS:
        return None
    v = VARIANTS[cfg.variant]
    if max(height, width) <= v.max_image_side:
        return None
    side = max(height, width)
    ours = [o for o in VARIANTS.values() if o.family == v.family and not o.name.startswith("delta")]
    bigger = [o for o in ours if o.image_size >= side] or [o for o in ours if o.max_image_side >= side]
    fix = f"use --config {bigger[0].preset}" if bigger else f"ask for at most {v.max_image_side} px a side"
    return (f"{width}x{height} px is beyond the {v.family.title} {v.image_size} model ({v.name}: trained at "
            f"{v.image_size} px, at most {v.max_image_side} px a side): {fix}")
