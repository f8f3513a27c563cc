"""A diffusers pipeline folder (what diffusers.PixArtAlphaPipeline / PixArtSigmaPipeline.from_pretrained load) from
this project's parts; the model's family (models/variants.py) names the pipeline class.

    ROOT/model_index.json
    ROOT/transformer/    config.json, diffusion_pytorch_model.safetensors (+ this project's null_caption.safetensors)
    ROOT/text_encoder/   a T5 encoder folder          ROOT/tokenizer/   its tokenizer files
    ROOT/vae/            an AutoencoderKL folder      ROOT/scheduler/   scheduler_config.json (LCM or DPM-Solver++)
"""

import json
import shutil
from pathlib import Path

import torch

from common.errors import CheckpointError
from common.files import atomic_path
from models.checkpoint import save_checkpoint
from models.pixart import PixArtConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # ours -> diffusers' prediction_type


def scheduler_config(kind: str, prediction: str = "eps", betas=("linear", 1e-4, 0.02), num_train: int = 1000) -> dict:
    """scheduler_config.json: "lcm" (PixArt-LCM: 50-step original grid, timestep scaling 10) or "dpm"
    (PixArt-alpha: DPM-Solver++ 2nd order, linspace timesteps)."""
    kinds = {"dpm": {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "solver_order": 2,
                     "timestep_spacing": "linspace"},
             "lcm": {"_class_name": "LCMScheduler", "original_inference_steps": 50, "timestep_scaling": 10.0}}
    if kind not in kinds:
        raise CheckpointError(f"unknown scheduler {kind!r}; valid: {', '.join(kinds)}")
    schedule, start, end = betas
    return {**kinds[kind], "num_train_timesteps": num_train, "beta_schedule": schedule, "beta_start": start,
            "beta_end": end, "prediction_type": PREDICTION_TYPES[prediction]}


def write_pipeline_folder(root: str | Path, transformer: dict[str, torch.Tensor], cfg: PixArtConfig,
                          text_encoder: str | Path, tokenizer: str | Path, vae: str | Path, scheduler: dict) -> Path:
    """Assemble the folder; text_encoder / tokenizer / vae are existing folders, copied in."""
    root = Path(root)
    if (root / "model_index.json").exists():
        raise CheckpointError(f"{root} already holds a pipeline (model_index.json); remove it or choose another "
                              f"destination")
    sources = {"text_encoder": Path(text_encoder), "tokenizer": Path(tokenizer), "vae": Path(vae)}
    for name, folder in sources.items():
        if not (folder / ("tokenizer_config.json" if name == "tokenizer" else "config.json")).is_file():
            raise CheckpointError(f"{name} folder {folder} is not a {name} folder of a pipeline (no config file)")
    save_checkpoint(transformer, cfg, root, "diffusers")
    shutil.copytree(sources["text_encoder"], root / "text_encoder",
                    ignore=shutil.ignore_patterns(*TOKENIZER_FILES, "known_words.txt"))
    (root / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (sources["tokenizer"] / name).is_file():
            shutil.copy2(sources["tokenizer"] / name, root / "tokenizer" / name)
    shutil.copytree(sources["vae"], root / "vae")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    # the family's pipeline class: PixArtAlphaPipeline | PixArtSigmaPipeline
    index = {"_class_name": cfg.family.diffusers_pipeline, "transformer": ["diffusers", "PixArtTransformer2DModel"],
             "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", scheduler["_class_name"]]}
    with atomic_path(root / "model_index.json") as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n")
    return root
