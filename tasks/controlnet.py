"""A ControlNet branch (PixArt-delta's ControlNet-Transformer, or the ControlNet-UNet baseline) trained on a frozen
PixArt as a training task (train/train_controlnet.py runs it).

Only the branch trains: the base (control.base) is frozen, never copied into the EMA or the training checkpoints,
and recorded by path and hash (a resume against another base is refused). The objective is the base's own
(PixArt-alpha's diffusion loss with the learned variance) with the control latents given to the model, captions
dropped to the null caption at train.class_dropout_prob (0.5 in the paper). The exported ema.safetensors /
weights.safetensors is the branch alone (models/controlnet.py), with the base's hash in its metadata.
"""

import logging
from pathlib import Path

import torch

from common.errors import UserError
from configs import Config
from data.features import INDEX_NAME, FeatureDataset, batch_conditions, read_index
from data.synthetic import colour_only_caption, conflicting_caption, parse_caption
from diffusion.losses import DiffusionLoss
from engine.loop import Task
from engine.precision import store_frozen
from engine.randomness import SampleRandomness
from models.autoencoder import load_autoencoder
from models.checkpoint import load_checkpoint
from models.controlnet import ControlledPixArt, build_branch, load_branch, save_branch
from models.shipped import content_hash
from pipeline.generate import preview_images

log = logging.getLogger("train")


def check_config(cfg: Config) -> None:
    """Every control option that can be checked before anything loads."""
    if not cfg.control.base:
        raise UserError("control.base is not set: the frozen base model the branch steers (any checkpoint format)")
    cfg.control.check(cfg.model.dims()[0])
    cache = Path(cfg.data.cache_dir)
    if (cache / INDEX_NAME).is_file() and "control" not in FeatureDataset(cache).shapes():
        raise UserError(f"the feature cache {cfg.data.cache_dir} has no control maps: extract it with "
                        f"tools/extract_features.py --control edge (or canny)")
    if (cfg.control.caption_conflict_prob or cfg.control.caption_colour_only_prob) and (cache / INDEX_NAME).is_file():
        first = read_index(cache)[0]["caption"]
        try:
            parse_caption(first)
        except UserError as e:
            raise UserError(f"control.caption_conflict_prob / caption_colour_only_prob rewrite captions of the "
                            f"synthetic shapes set, and the cache {cache} holds others ({e}): set both to 0") from e


class ControlNetTask(Task):
    """A frozen base + a trainable control branch; the loss is the base's diffusion loss given the control."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, cc = cfg, cfg.control
        base, _, _ = load_checkpoint(cc.base, cfg.model, device=device)  # the config must fit the base
        base = base.float()  # shipped weights may be fp16; the loop's autocast gives bf16/fp16 compute
        self.base_hash = content_hash(cc.base)
        if cfg.train.init_from:  # fine-tune a trained branch (its N, design, width and base are checked)
            branch = load_branch(cfg.train.init_from, base, cc, self.base_hash).to(device)
            log.info("branch from %s", cfg.train.init_from)
        else:
            branch = build_branch(base, cc)
        store_frozen(base.requires_grad_(False), cfg.train.frozen_dtype)  # after the branch copied its blocks in fp32
        self.model = ControlledPixArt(base, branch.requires_grad_(True)).train()
        self.schedule = cfg.diffusion.build()
        self.criterion = DiffusionLoss.from_config(cfg, self.schedule)
        self.vae = None  # loaded at the first sample grid
        self.text_encoder, self.captions = None, None
        if cc.caption_conflict_prob or cc.caption_colour_only_prob:  # captions re-written and encoded per batch
            from models.text_encoder import load_text_encoder

            self.text_encoder = load_text_encoder(cfg.text_encoder, device)
            self.captions = [e["caption"] for e in read_index(cfg.data.cache_dir)]

    def references(self) -> dict[str, dict]:
        return {"base": {"path": str(self.cfg.control.base), "sha256": self.base_hash}}

    def loss(self, model, batch: dict, rng: SampleRandomness) -> tuple[torch.Tensor, dict]:
        if "control" not in batch:
            raise UserError(f"the feature cache {self.cfg.data.cache_dir} has no control maps: extract it with "
                            f"tools/extract_features.py --control edge (or canny)")
        cond = batch_conditions(self.model, batch)
        if self.text_encoder is not None:
            cond = {**cond, **self.rewritten_captions(batch, rng)}
        return self.criterion.training_loss(model, batch["latent"], rng, self.cfg.train.class_dropout_prob,
                                            **cond, control=batch["control"])

    def rewritten_captions(self, batch: dict, rng: SampleRandomness) -> dict:
        """The batch's caption features with a share of the captions replaced (control.caption_conflict_prob: other
        kinds at other places; control.caption_colour_only_prob: the colours alone); the images and maps stay."""
        cc = self.cfg.control
        u = rng.rand("cpu").tolist()
        kind_shifts, cell_shifts = rng.randint(4 * 81, "cpu").tolist(), rng.randint(8 * 81, "cpu").tolist()
        texts = {}
        for row, (i, draw) in enumerate(zip(batch["index"].tolist(), u)):
            text = self.captions[i]
            if draw < cc.caption_conflict_prob:  # one draw gives every object's shifts: digits in bases 4 and 8
                n = len(parse_caption(text))
                texts[row] = conflicting_caption(text, [kind_shifts[row] // 4**j for j in range(n)],
                                                 [cell_shifts[row] // 8**j for j in range(n)])
            elif draw < cc.caption_conflict_prob + cc.caption_colour_only_prob:
                texts[row] = colour_only_caption(text)
        y, mask = batch["y"], batch["mask"]
        if texts:
            features, new_mask = self.text_encoder.encode(list(texts.values()))
            rows = torch.tensor(list(texts), device=y.device)
            y, mask = y.clone(), mask.clone()
            y[rows], mask[rows] = features.to(y), new_mask.to(mask)
        return {"y": y, "mask": mask}

    def sample(self, model, batch: dict, step: int) -> torch.Tensor:
        """The cached captions and control maps drawn with the sample config; the control maps above the images."""
        if self.vae is None:
            self.vae = load_autoencoder(self.cfg.autoencoder, batch["latent"].device)
        cond = {**batch_conditions(self.model, batch), "control": batch["control"],
                "control_scale": self.cfg.control.scale}
        images = preview_images(model, self.vae, self.schedule, self.cfg.sample, cond, batch["latent"].shape[-2:],
                                self.cfg.diffusion.prediction)
        with torch.no_grad():
            controls = ((self.vae.decode(batch["control"]).float() + 1) / 2).clamp(0, 1)
        return torch.cat([controls, images])

    def export(self, state_dict: dict, path: Path, metadata: dict) -> None:
        """The branch alone (the base is referenced by its hash)."""
        branch = {k[len("branch."):]: v for k, v in state_dict.items() if k.startswith("branch.")}
        save_branch(self.model.branch, self.model.base_model, path, self.base_hash,
                    extra={**metadata, "base": str(self.cfg.control.base)}, state=branch)
