"""Distribution matching distillation (DMD2) as a training task: a one- or few-step generator distilled from a
PixArt-alpha teacher (train/train_dmd.py runs it; the objectives are diffusion/dmd.py).

Networks: the generator (trained; exported and sampled, with an EMA if train.ema_decay > 0), the fake score
(trained dmd.fake_updates times per generator update, on the generator's samples, at dmd.fake_lr; with the GAN
head when dmd.gan_weight > 0) and the teacher (the frozen real score, read from dmd.teacher, stored as
train.frozen_dtype, recorded by path and hash). Generator and fake score start as copies of the teacher (the
generator as dmd.generator_init instead when it is set, e.g. the LCD student; with dmd.generator_depth, deepened by
identity blocks). With dmd.regression_weight > 0 the
generator's loss adds DMD's regression term on the teacher's noise-image pairs (dmd.pairs, held in memory): a
distance in pixels plus, with dmd.regression_feature_weight > 0, one in the frozen teacher's tokens. With that term
alone (dmd.distribution_weight and dmd.gan_weight 0) no fake score is built or trained.
"""

import contextlib
import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError
from configs import Config
from data.features import batch_conditions
from data.pairs import load_pairs, read_pairs_metadata, read_pairs_shapes, read_pairs_timesteps
from diffusion.dmd import (
    DistributionMatching,
    FakeScore,
    TeacherFeatures,
    gan_generator_loss,
    gan_head_loss,
    generator_timesteps,
)
from diffusion.guidance import null_caption_pair
from diffusion.samplers import sampler_timesteps
from engine.loop import Task, Trainable
from engine.precision import store_frozen
from engine.randomness import SampleRandomness
from models.autoencoder import load_autoencoder
from models.checkpoint import load_checkpoint, peek, save_checkpoint
from models.pixart import build_pixart, deepened, identity_block_positions
from models.shipped import content_hash
from pipeline.generate import preview_images

log = logging.getLogger("train")


def check_config(cfg: Config) -> None:
    """Everything of the dmd: section that can be checked before anything loads."""
    dc = cfg.dmd
    dc.check(cfg.diffusion.num_steps)
    info = peek(dc.teacher)
    if dc.real_guidance > 1 and info.null_caption is False:
        raise UserError(f"dmd.real_guidance={dc.real_guidance} guides the teacher with its learned null caption, but "
                        f"{dc.teacher} has none (a plain diffusers folder): use a checkpoint that holds y_embedding "
                        f"(an official .pth, this project's safetensors, or a folder converted by "
                        f"tools/convert_checkpoint.py), or set dmd.real_guidance=1")
    check_sample_timesteps(cfg)
    depth = cfg.model.dims()[0]
    if dc.generator_depth is not None and dc.generator_depth < depth:
        raise UserError(f"dmd.generator_depth={dc.generator_depth} is less than the teacher's {depth} blocks: the "
                        f"generator starts as the teacher with extra identity blocks; set it to {depth} or more, or "
                        f"to null")
    if dc.generator_init:
        if not Path(dc.generator_init).exists():
            raise UserError(f"dmd.generator_init={dc.generator_init} does not exist: the generator starts from a "
                            f"checkpoint of the teacher's architecture (a run's ema.safetensors, or the file the "
                            f"preset names: configs/dmd_shapes_2step.yaml starts from the one-step generator that "
                            f"`python train/shapes_recipe.py dmd` keeps); point it at one, or set "
                            f"dmd.generator_init=null to start from the teacher")
        init = peek(dc.generator_init).config
        if init is not None and info.config is not None and init != info.config:
            only_deeper = replace(init, depth=info.config.depth) == info.config and init.depth > info.config.depth
            if not only_deeper:
                raise UserError(f"dmd.generator_init={dc.generator_init} is not of the teacher's architecture "
                                f"({init} against {info.config}): the generator and the fake score share one model "
                                f"config; start the generator from a checkpoint of the teacher's shape")
            if dc.generator_depth != init.depth:
                raise UserError(f"dmd.generator_init={dc.generator_init} is the teacher's architecture with "
                                f"{init.depth} blocks (a dmd.generator_depth run's export); set "
                                f"dmd.generator_depth={init.depth} to train it on, or start from a checkpoint of the "
                                f"teacher's {info.config.depth} blocks")
    if dc.pairs:  # last: the pairs are made from the teacher, so its errors come first
        if dc.regression_steps == "own" and not Path(dc.pairs).exists():
            later = start_timesteps_arg(dc, cfg.diffusion.num_steps)
            raise UserError(f"dmd.pairs={dc.pairs} does not exist: dmd.regression_steps=own needs pairs with rows at "
                            f"the generator's later steps; make the pairs from noise (python tools/make_ode_pairs.py "
                            f"PAIRS --config TEACHER_CONFIG --num N), then add those rows (python "
                            f"tools/make_ode_pairs.py {dc.pairs} --config TEACHER_CONFIG --extend PAIRS "
                            f"--start-timesteps {later}; configs/dmd_shapes_4step.yaml has the shapes commands)")
        meta = read_pairs_metadata(dc.pairs)
        if meta.get("teacher_sha256") != content_hash(dc.teacher):
            raise UserError(f"dmd.pairs={dc.pairs} was sampled from {meta.get('teacher')!r}, not from dmd.teacher="
                            f"{dc.teacher} (their contents differ): make the pairs with this teacher (python "
                            f"tools/make_ode_pairs.py OUT --config CONFIG --set sample.checkpoint={dc.teacher})")
        shapes = read_pairs_shapes(dc.pairs)  # any latent size and caption length; the channels must be the model's
        got = {"image channels": shapes.get("image", (0, 0))[1], "caption channels": shapes.get("y", (0, 0, 0))[-1]}
        want = {"image channels": cfg.model.in_channels, "caption channels": cfg.model.caption_channels}
        if got != want:
            raise UserError(f"dmd.pairs={dc.pairs} holds {got}, the model takes {want}: make the pairs with the "
                            f"teacher's config")
        check_pair_timesteps(dc, read_pairs_timesteps(dc.pairs), cfg.diffusion.num_steps)


def check_sample_timesteps(cfg: Config) -> None:
    """The sample section (training's preview grids, and every tool that reads the config) must draw a
    generator_steps-step student at the timesteps it is trained at."""
    dc, s = cfg.dmd, cfg.sample
    if s.sampler != "lcm" or s.steps != dc.generator_steps:
        return
    trained = generator_timesteps(dc.generator_steps, cfg.diffusion.num_steps, dc.generator_timesteps).tolist()
    sampled = sampler_timesteps("lcm", s.steps, cfg.diffusion.num_steps, s.sampler_options).tolist()
    if sampled != trained:
        raise UserError(f"the generator trains at timesteps {trained} (dmd.generator_timesteps) but the sample "
                        f"section draws its {s.steps} steps at {sampled}: set sample.sampler_options to "
                        f"{{timesteps: {trained}}}" + (" (or drop its timesteps)" if dc.generator_timesteps is None
                                                       else ""))


def start_timesteps_arg(dc, num_train: int) -> str:
    """The generator's later timesteps as tools/make_ode_pairs.py --start-timesteps takes them ("759,499,259")."""
    return ",".join(map(str, generator_timesteps(dc.generator_steps, num_train, dc.generator_timesteps)[1:].tolist()))


def check_pair_timesteps(dc, timesteps: list[int] | None, num_train: int) -> None:
    """dmd.regression_steps=own needs pairs with rows that start at the generator's timesteps (rows at others are
    left out, so one file of 759, 499, 259 serves the 4-step and the 2-step generator); the other modes run every
    row from pure noise, so they refuse re-noised rows (which they would read as noise)."""
    steps = generator_timesteps(dc.generator_steps, num_train, dc.generator_timesteps).tolist()
    make = (f"python tools/make_ode_pairs.py OUT --config TEACHER_CONFIG --extend {dc.pairs} --start-timesteps "
            f"{start_timesteps_arg(dc, num_train)}")
    if dc.regression_steps == "own":
        if len(steps) == 1:
            raise UserError("dmd.regression_steps=own trains the later steps of a few-step generator on their own "
                            "pairs, but dmd.generator_steps is 1: use dmd.regression_steps=first (or all) with pairs "
                            "from noise")
        if timesteps is None:
            raise UserError(f"dmd.regression_steps=own trains each generator step on pairs that start at its "
                            f"timestep, but dmd.pairs={dc.pairs} holds rows from pure noise only: make them with "
                            f"{make}")
        missing = sorted(set(steps[1:]) - set(timesteps), reverse=True)
        if missing:
            raise UserError(f"dmd.pairs={dc.pairs} starts rows at timesteps {timesteps}, but the "
                            f"{dc.generator_steps}-step generator ({steps}) has later steps at {missing} that no row "
                            f"starts at (their regression term would be empty): make the pairs with {make}")
    elif timesteps is not None:
        raise UserError(f"dmd.pairs={dc.pairs} holds rows re-noised to timesteps {timesteps}, which "
                        f"dmd.regression_steps={dc.regression_steps} would read as pure noise: set "
                        f"dmd.regression_steps=own")


@contextlib.contextmanager
def no_parameter_grads(module: nn.Module):
    """Within the block, gradients flow through `module` to its inputs but not into its parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


class DMDTask(Task):
    """DMD2 of cfg.dmd.teacher into a generator of cfg.model's architecture that draws in dmd.generator_steps."""

    exported_network = "generator"
    trained_networks = ("fake_score", "generator")

    @classmethod
    def trained_network_names(cls, cfg: Config) -> tuple[str, ...]:
        """The fake score only where a term reads it (the DMD term or the GAN term): with dmd.regression_weight alone
        the generator is the one network, and a step costs one generator call per row."""
        return cls.trained_networks if cfg.dmd.reads_fake_score else ("generator",)

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, dc = cfg, cfg.dmd
        teacher, _, _ = load_checkpoint(dc.teacher, cfg.model, device=device)  # the config must fit the teacher
        teacher = teacher.float()  # shipped weights may be fp16; training runs in fp32 (autocast for bf16/fp16)
        self.teacher_hash = content_hash(dc.teacher)
        copies = []
        for _ in range(2):
            net = build_pixart(cfg.model, device)
            net.load_state_dict(teacher.state_dict())
            copies.append(net.train().requires_grad_(True))
        self.generator = copies[0]
        if dc.generator_init:
            deeper = dc.generator_depth is not None and peek(dc.generator_init).config.depth == dc.generator_depth
            init, _, _ = load_checkpoint(dc.generator_init, None if deeper else cfg.model, device=device)
            if deeper:  # check_config has checked it is the teacher's architecture but for the depth
                self.generator = init.float().train().requires_grad_(True)
            else:
                self.generator.load_state_dict(init.float().state_dict())
            self.generator_init_hash = content_hash(dc.generator_init)
            log.info("generator starts as %s", dc.generator_init)
        if dc.generator_depth is not None and dc.generator_depth > len(self.generator.blocks):
            self.generator = deepened(self.generator, dc.generator_depth).train().requires_grad_(True)
            log.info("generator deepened to %d blocks (new blocks at %s start as identity)", dc.generator_depth,
                     identity_block_positions(len(teacher.blocks), dc.generator_depth))
        self.fake = None
        if dc.reads_fake_score:
            self.fake = FakeScore(copies[1], gan_head=dc.gan_weight > 0, pool=dc.gan_pool).to(device).train()
        else:
            log.info("regression term alone (dmd.distribution_weight=0, dmd.gan_weight=0): no fake score is trained")
        self.teacher = store_frozen(teacher.eval().requires_grad_(False), cfg.train.frozen_dtype)
        self.model = self.generator
        self.schedule = cfg.diffusion.build()
        self.objective = DistributionMatching(self.schedule, cfg.diffusion.prediction, dc.generator_steps,
                                              dc.real_guidance, dc.t_min, dc.t_max,
                                              regression_edge_weight=dc.regression_edge_weight,
                                              explicit_timesteps=dc.generator_timesteps)
        self.vae = None  # loaded at the first sample grid
        self.pairs = None
        if dc.regression_weight > 0:
            self.pairs = load_pairs(dc.pairs)  # check_config has checked their channels against the model
            if dc.regression_steps == "own":  # the rows at the generator's timesteps
                keep = torch.isin(self.pairs["timestep"], self.objective.timesteps)
                self.pairs = {k: v[keep] for k, v in self.pairs.items()}
            log.info("regression term on %d noise-image pairs of %s", len(self.pairs["image"]), dc.pairs)

    def networks(self) -> dict[str, Trainable]:
        """The fake score first (its dmd.fake_updates updates; none when no term reads it), then the generator (one
        update), each step."""
        dc = self.cfg.dmd
        if self.fake is None:
            return {"generator": Trainable(self.generator)}
        return {"fake_score": Trainable(self.fake, lr=dc.fake_lr, ema_decay=0.0, updates_per_step=dc.fake_updates),
                "generator": Trainable(self.generator)}

    def references(self) -> dict[str, dict]:
        refs = {"teacher": {"path": str(self.cfg.dmd.teacher), "sha256": self.teacher_hash}}
        if self.cfg.dmd.generator_init:
            refs["generator_init"] = {"path": str(self.cfg.dmd.generator_init), "sha256": self.generator_init_hash}
        return refs

    def _sample(self, batch: dict, rng: SampleRandomness, cond: dict, with_grad: bool) -> torch.Tensor:
        """Generator samples for the batch: each sample's step drawn uniformly (backward simulation) from the first
        dmd.matching_steps."""
        x0 = batch["latent"]
        k = len(self.objective.timesteps)
        noise = rng.randn(x0.shape[1:], x0.device)
        fresh = [rng.randn(x0.shape[1:], x0.device) for _ in range(k - 1)]
        steps = k if self.cfg.dmd.matching_steps is None else self.cfg.dmd.matching_steps
        stop = rng.randint(steps, x0.device)  # (N,) the step whose output is trained
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            images, _ = self.objective.generate(self.generator, noise, cond, fresh, stop)
        return images

    def update(self, name: str, model, batch: dict, rng: SampleRandomness) -> tuple[torch.Tensor, dict]:
        dc = self.cfg.dmd
        cond = batch_conditions(self.generator, batch)
        x0 = batch["latent"]
        if name == "fake_score":  # denoising loss on the generator's samples (+ the GAN head on real vs generated)
            images = self._sample(batch, rng, cond, with_grad=False)
            t = rng.randint(self.schedule.num_steps, x0.device)
            noise = rng.randn(x0.shape[1:], x0.device)
            loss = self.objective.fake_score_loss(model, images, t, noise, cond)
            terms = {"fake_mse": loss.mean().item()}
            if self.fake.head is not None:
                t_gan = self.objective.noise_levels(rng.rand(x0.device), dc.gan_t_max)
                real = self.schedule.q_sample(x0.float(), t_gan, rng.randn(x0.shape[1:], x0.device))
                fake = self.schedule.q_sample(images, t_gan, rng.randn(x0.shape[1:], x0.device))
                head = gan_head_loss(self.fake.logits(real, t_gan, **cond), self.fake.logits(fake, t_gan, **cond))
                loss = loss + dc.gan_head_weight * head
                terms["gan_head"] = head.mean().item()
            return loss.mean(), terms
        if self.fake is None:  # name == "generator", the regression term alone
            regression = self._regression(batch, rng)
            return dc.regression_weight * regression.mean(), {"regression": regression.mean().item()}
        images = self._sample(batch, rng, cond, with_grad=True)  # name == "generator"
        t = self.objective.noise_levels(rng.rand(x0.device))
        noise = rng.randn(x0.shape[1:], x0.device)
        c, u = null_caption_pair(cond)
        loss, terms = self.objective.generator_loss(images, self.teacher, self.fake, t, noise, c, u)
        out = {"dmd": loss.mean().item(), "dmd_grad_norm": terms["dmd_grad_norm"].mean().item()}
        loss = dc.distribution_weight * loss
        if self.pairs is not None:
            regression = self._regression(batch, rng)
            loss = loss + dc.regression_weight * regression
            out["regression"] = regression.mean().item()
        if self.fake.head is not None:
            t_gan = self.objective.noise_levels(rng.rand(x0.device), dc.gan_t_max)
            noised = self.schedule.q_sample(images, t_gan, rng.randn(x0.shape[1:], x0.device))
            with no_parameter_grads(self.fake):
                gan = gan_generator_loss(self.fake.logits(noised, t_gan, **cond))
            loss = loss + dc.gan_weight * gan
            out["gan"] = gan.mean().item()
        return loss.mean(), out

    def _regression(self, batch: dict, rng: SampleRandomness) -> torch.Tensor:
        """The regression term (N,) on a random pair per sample (drawn after every other draw of the step); for a
        multi-step generator with dmd.regression_steps=all, each pair's step and re-noising drawn after the pair; with
        own, each row's step is the one at the row's timestep, fed the row's stored (re-noised) latent."""
        device = batch["latent"].device
        pick = rng.randint(len(self.pairs["image"]), device).cpu()
        pairs = {k: v[pick].to(device) for k, v in self.pairs.items()}
        h, w = pairs["image"].shape[-2:]
        down = batch["resolution"][0, 0].item() / batch["latent"].shape[-2]  # image pixels per latent pixel
        pair_batch = {"y": pairs["y"], "mask": pairs["mask"].long(),
                      "resolution": torch.tensor([[h * down, w * down]], device=device).expand(len(pick), 2),
                      "aspect_ratio": torch.tensor([[h / w]], device=device).expand(len(pick), 1)}
        cond = batch_conditions(self.generator, pair_batch)
        k = len(self.objective.timesteps)
        shape = pairs["noise"].shape[1:]
        features = None
        if self.cfg.dmd.regression_feature_weight > 0:  # its timesteps and noise drawn before the steps' re-noising
            dc = self.cfg.dmd
            t = (rng.rand(device) * dc.regression_feature_t * self.schedule.num_steps).long()
            features = TeacherFeatures(self.teacher, t.clamp(max=self.schedule.num_steps - 1),
                                       rng.randn(shape, device), dc.regression_feature_weight)
        if self.cfg.dmd.regression_steps == "own":  # each row the step at its own timestep, from its stored input
            loss = self.objective.regression_loss_at(self.generator, pairs["noise"], pairs["timestep"],
                                                     pairs["image"], cond, features)
            step = (self.objective.timesteps.to(device)[None, :] == pairs["timestep"][:, None]).long().argmax(1)
            return loss * self._step_weights(device)[step]
        if k == 1 or self.cfg.dmd.regression_steps == "first":
            return self.objective.regression_loss(self.generator, pairs["noise"], pairs["image"], cond,
                                                  features=features)
        fresh = [rng.randn(shape, device) for _ in range(k - 1)]
        stop = rng.randint(k, device)  # each pair's trained step, as the DMD term's samples
        loss = self.objective.regression_loss(self.generator, pairs["noise"], pairs["image"], cond, fresh, stop,
                                              features)
        return loss * self._step_weights(device)[stop]

    def _step_weights(self, device) -> torch.Tensor:
        """The regression weight of each generator step (K,), dmd.regression_step_weights (all 1 when unset)."""
        weights = self.cfg.dmd.regression_step_weights or [1.0] * len(self.objective.timesteps)
        return torch.tensor(weights, dtype=torch.float32, device=device)

    def sample(self, model, batch: dict, step: int) -> torch.Tensor:
        """The cached captions drawn by the generator with the sample config (its LCM steps, no CFG)."""
        if self.vae is None:
            self.vae = load_autoencoder(self.cfg.autoencoder, batch["latent"].device)
        return preview_images(model, self.vae, self.schedule, self.cfg.sample, batch_conditions(self.model, batch),
                              batch["latent"].shape[-2:], self.cfg.diffusion.prediction)

    def export(self, state_dict: dict, path: Path, metadata: dict) -> None:
        """The generator as this project's safetensors, sampled with `--sampler lcm --steps dmd.generator_steps`."""
        dc = self.cfg.dmd
        save_checkpoint(state_dict, self.generator.cfg, path, "safetensors",
                        metadata={**metadata, "teacher": str(dc.teacher), "teacher_sha256": self.teacher_hash,
                                  "distillation": "dmd2", "generator_steps": str(dc.generator_steps),
                                  "generator_timesteps": ",".join(map(str, self.objective.timesteps.tolist()))})
