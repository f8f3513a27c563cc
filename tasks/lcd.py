"""Latent consistency distillation (PixArt-delta Algorithm 1) as a training task: a PixArt-alpha teacher distilled
into a student that draws in 1-4 LCM steps (train/train_lcm.py runs it; the objective is diffusion/consistency.py).

Networks: the student (trainable; a copy of the teacher, or the teacher with LoRA adapters), the target (an EMA of
the student's trainable weights with mu = distill.target_decay, or ramped up to it from distill.target_decay_start;
owned by this task, checkpointed and exactly resumed) and the teacher (frozen, read from distill.teacher; never
copied into the EMA or checkpoints, recorded by path and hash: a resume with another teacher is refused). With LoRA
one copy of the weights serves all three: the teacher is the model with adapters off, the target the model with
the EMA adapters in place.
"""

import logging
from dataclasses import replace
from pathlib import Path

import torch

from common.errors import UserError
from configs import Config
from data.features import batch_conditions
from diffusion.consistency import ConsistencyDistillationLoss
from diffusion.guidance import null_caption_pair
from engine.ema import EMA
from engine.loop import Task
from engine.precision import store_frozen
from engine.randomness import SampleRandomness
from models.autoencoder import load_autoencoder
from models.checkpoint import load_checkpoint, save_checkpoint
from models.lora import adapters_disabled, add_lora, merged_state_dict, save_diffusers_lora, scaling
from models.pixart import build_pixart
from models.shipped import content_hash
from pipeline.generate import preview_images

log = logging.getLogger("train")


class LCMTask(Task):
    """Latent consistency distillation of cfg.distill.teacher into cfg.model (plus a guidance embedding if set)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, dc = cfg, cfg.distill
        teacher, _, _ = load_checkpoint(dc.teacher, cfg.model, device=device)  # the config must fit the teacher
        teacher = teacher.float()  # shipped weights may be fp16; training runs in fp32 (autocast for bf16/fp16)
        self.teacher_hash = content_hash(dc.teacher)
        if dc.lora_rank:
            self.model = add_lora(teacher, dc.lora_rank, dc.lora_alpha)  # adapters only are trainable
            self.teacher = None  # the same network with adapters off
        else:
            student = build_pixart(replace(cfg.model, guidance_embedding=dc.guidance_embedding), device)
            missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
            assert not unexpected and all(k.startswith("w_embedder.") for k in missing), (missing, unexpected)
            self.model = student.train().requires_grad_(True)
            self.teacher = store_frozen(teacher.eval().requires_grad_(False), cfg.train.frozen_dtype)
        if dc.lora_rank:
            store_frozen(self.model, cfg.train.frozen_dtype)  # the base weights under the adapters
        self.target = EMA(self.model, dc.target_rate(0), warmup=False)  # no EMA warm-up: mu from the first step
        self.schedule = cfg.diffusion.build()
        self.criterion = ConsistencyDistillationLoss(self.schedule, cfg.diffusion.prediction, dc.ddim_steps, dc.loss,
                                                     dc.huber_c, teacher_substeps=dc.teacher_substeps)
        self.vae = None  # loaded at the first sample grid

    def references(self) -> dict[str, dict]:
        return {"teacher": {"path": str(self.cfg.distill.teacher), "sha256": self.teacher_hash}}

    def teacher_net(self, x, t, **cond):
        if self.teacher is not None:
            return self.teacher(x, t, **cond)
        with adapters_disabled(self.model):
            return self.model(x, t, **cond)

    def target_net(self, x, t, **cond):
        """The student's network with the target's (EMA) weights swapped in; called before the student's forward."""
        with torch.no_grad(), self.target.applied(self.model):
            return self.model(x, t, **cond)

    def loss(self, model, batch: dict, rng: SampleRandomness) -> tuple[torch.Tensor, dict]:
        dc = self.cfg.distill
        x0 = batch["latent"]  # (N, C, h, w)
        noise = rng.randn(x0.shape[1:], x0.device)  # (N, C, h, w)
        n = rng.randint(dc.ddim_steps, x0.device)  # (N,) grid index
        if dc.guidance_embedding:
            w = dc.w_min + (dc.w_max - dc.w_min) * rng.rand(x0.device)  # (N,) w ~ U[w_min, w_max]
            student_cond = {"guidance": w}
        else:
            w = torch.full((len(x0),), dc.guidance, device=x0.device)
            student_cond = {}
        cond, uncond = null_caption_pair(batch_conditions(self.model, batch))
        per_sample, terms = self.criterion(model, self.target_net, self.teacher_net, x0, noise, n, w, cond, uncond,
                                           student_cond)
        return per_sample.mean(), {"rms_distance": terms["distance"].mean().item()}

    def after_step(self, model) -> None:
        self.target.decay = self.cfg.distill.target_rate(self.target.updates)  # resumes exactly: updates are saved
        self.target.update(self.model)

    def state_dict(self) -> dict:
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])

    def sample(self, model, batch: dict, step: int) -> torch.Tensor:
        """The cached captions drawn by the student with the sample config (LCM steps, no CFG)."""
        if self.vae is None:
            self.vae = load_autoencoder(self.cfg.autoencoder, batch["latent"].device)
        return preview_images(model, self.vae, self.schedule, self.cfg.sample, batch_conditions(self.model, batch),
                              batch["latent"].shape[-2:], self.cfg.diffusion.prediction)

    def student_config(self):
        return replace(self.cfg.model, guidance_embedding=self.cfg.distill.guidance_embedding)

    def export(self, state_dict: dict, path: Path, metadata: dict) -> None:
        """The student as this project's safetensors (any LoRA folded into the weights); an LCM-LoRA run also writes
        its adapters alone beside it (NAME.lora.safetensors, diffusers' peft layout, see models/lora.py)."""
        dc = self.cfg.distill
        if dc.lora_rank:
            save_diffusers_lora(state_dict, dc.lora_rank, dc.lora_alpha, path.with_suffix(".lora.safetensors"),
                                {"teacher": str(dc.teacher), "teacher_sha256": self.teacher_hash})
            state_dict = merged_state_dict(state_dict, scaling(dc.lora_rank, dc.lora_alpha))
        save_checkpoint(state_dict, self.student_config(), path, "safetensors",
                        metadata={**metadata, "teacher": str(dc.teacher), "teacher_sha256": self.teacher_hash})


def check_config(cfg: Config) -> None:
    """The distill: section, before anything loads: a LoRA rank above the blocks' width adds nothing but memory."""
    cfg.distill.check(cfg.diffusion.num_steps)
    width = cfg.model.dims()[1]
    if cfg.distill.lora_rank > width:
        raise UserError(f"distill.lora_rank={cfg.distill.lora_rank} is above the width of the layers it adapts "
                        f"({width}, model.hidden_size): a rank-r adapter of a {width}-wide layer is full rank at "
                        f"r = {width}; use a rank of at most {width}")

