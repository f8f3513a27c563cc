"""The run config, the top floor: one typed section per part of the system, each defined in a torch-free config module
of the package it configures (diffusion/config.py, models/config.py, models/variants.py, ...), so reading a YAML
imports no torch."""

from dataclasses import dataclass, field

from diffusion.config import DiffusionConfig, DistillConfig, DMDConfig
from engine.config import DataConfig, TrainConfig
from evaluation.config import EvaluationConfig
from models.config import AutoencoderConfig, ControlConfig, TextEncoderConfig
from models.variants import VARIANTS, PixArtConfig
from pipeline.config import SampleConfig


@dataclass
class Config:
    """Resolved options of a run; saved beside every checkpoint and into every run directory."""

    model: PixArtConfig = field(default_factory=PixArtConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    control: ControlConfig = field(default_factory=ControlConfig)

    @classmethod
    def config_defaults(cls, data: dict) -> dict:
        """Defaults one section's value sets in another (what the file or --set gives still wins):
        - a model variant (model.variant) sets the text encoder's caption length: its family's;
        - a DMD generator at given timesteps (dmd.generator_timesteps) is sampled at them (sample.sampler_options
          timesteps) when the sample section draws it with LCM at its step count."""
        defaults = {}
        model = data.get("model") or {}
        variant = VARIANTS.get(model.get("variant")) if isinstance(model, dict) else None
        if variant:
            defaults["text_encoder"] = {"max_tokens": variant.family.caption_tokens}
        dmd, sample = data.get("dmd") or {}, data.get("sample") or {}
        if isinstance(dmd, dict) and isinstance(sample, dict) and isinstance(dmd.get("generator_timesteps"), list):
            lcm = sample.get("sampler", SampleConfig.sampler) == "lcm"
            if lcm and sample.get("steps", SampleConfig.steps) == dmd.get("generator_steps", DMDConfig.generator_steps):
                defaults["sample"] = {"sampler_options": {"timesteps": dmd["generator_timesteps"]}}
        return defaults
