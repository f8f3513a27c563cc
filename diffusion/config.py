"""The diffusion/ sections of a run config (`diffusion:`, `distill:`, `dmd:`): plain dataclasses that import no
torch, so reading a config stays cheap; the code they configure lives beside them (schedule.py, consistency.py,
dmd.py) and imports them from here."""

import math
from dataclasses import dataclass
from typing import Literal

from common.choices import check_choices
from common.errors import UserError

Schedule = Literal["linear", "scaled_linear"]  # linear: PixArt (betas 1e-4 -> 0.02); scaled_linear: Stable Diffusion
Prediction = Literal["eps", "v", "x0"]          # what a network's first C output channels predict
Loss = Literal["huber", "l2"]                  # the consistency distance: pseudo-Huber (LCM) or squared
PREDICTIONS = Prediction.__args__
LOSSES = Loss.__args__


@dataclass
class DiffusionConfig:
    """The training noise schedule; the `diffusion:` section of a run config."""

    schedule: Schedule = "linear"          # linear (PixArt: betas 1e-4 -> 0.02) | scaled_linear (Stable Diffusion)
    num_steps: int = 1000             # training timesteps T
    beta_start: float | None = None   # None: the schedule's default
    beta_end: float | None = None     # None: the schedule's default
    prediction: Prediction = "eps"         # the network predicts eps (PixArt) | v (alpha eps - sigma x0) | x0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_choices(self, "diffusion")
        if self.num_steps < 1:
            raise UserError(f"diffusion.num_steps must be >= 1, got {self.num_steps}")

    def build(self) -> "NoiseSchedule":  # noqa: F821 (diffusion.schedule imports torch: loaded when used)
        from diffusion.schedule import NoiseSchedule

        return NoiseSchedule.from_name(self.schedule, self.num_steps, self.beta_start, self.beta_end)


@dataclass
class DistillConfig:
    """Latent consistency distillation; the `distill:` section of a run config (train/train_lcm.py)."""

    teacher: str | None = None       # the frozen teacher's checkpoint (any format); the student starts as it
    ddim_steps: int = 50             # K of the teacher's DDIM grid; skip k = T / K must be a whole number (20)
    guidance: float = 4.5            # fixed w of the teacher: eps_c + w (eps_c - eps_u), uncond = null caption
    guidance_embedding: bool = False # LCM-style: w ~ U[w_min, w_max] per sample, given to the student as input
    w_min: float = 3.0
    w_max: float = 15.0
    loss: Loss = "huber"               # huber (c = huber_c) | l2
    huber_c: float = 0.001
    target_decay: float = 0.95       # mu of the EMA target network
    target_decay_start: float | None = None  # set: mu starts here and reaches target_decay after target_decay_ramp
    target_decay_ramp: int = 0               # steps, the target's horizon 1 / (1 - mu) growing geometrically
    teacher_substeps: int = 1        # guided DDIM steps of the teacher from t_n to t_{n-k} (1: the paper's single
                                     # step; more: a more exact ODE solve over the skip, as multi-step solvers do)
    lora_rank: int = 0               # > 0: LCM-LoRA, adapters of this rank; the teacher is the adapters-off model
    lora_alpha: float | None = None  # LoRA scale alpha / rank (None: alpha = rank)

    @property
    def reads_fake_score(self) -> bool:
        """Whether a generator term reads the fake score (the DMD term, the GAN term); if not, none is trained."""
        return self.distribution_weight > 0 or self.gan_weight > 0

    def check(self, num_train_steps: int) -> None:
        """Raise a UserError naming the key for an inconsistent section (before anything is loaded)."""
        if not self.teacher:
            raise UserError("distill.teacher is not set: the checkpoint of the teacher to distil (any format)")
        self.validate()
        if num_train_steps % self.ddim_steps or not 1 <= self.ddim_steps <= num_train_steps:
            skip = num_train_steps / self.ddim_steps
            raise UserError(f"distill.ddim_steps={self.ddim_steps} gives a skip of {skip:g}"
                             f" timesteps, which does not divide the {num_train_steps}-step schedule; use a divisor "
                             f"of {num_train_steps} (50: k = 20, the paper's)")
        skip = num_train_steps // self.ddim_steps
        if not 1 <= self.teacher_substeps <= skip:
            raise UserError(f"distill.teacher_substeps must be in 1..{skip} (the skip of {skip} timesteps it divides), "
                            f"got {self.teacher_substeps}")

    def validate(self) -> None:
        """Checks of this section alone (the loader calls it; check() adds the schedule's)."""
        check_choices(self, "distill")
        if self.guidance_embedding and not self.w_min <= self.w_max:
            raise UserError(f"distill.w_min={self.w_min} > distill.w_max={self.w_max}: w is drawn from [w_min, w_max]")
        if self.guidance < 0 or self.w_min < 0:
            raise UserError(f"guidance w must be >= 0 (w = 0 is the conditional teacher), got guidance="
                             f"{self.guidance}, w_min={self.w_min}")
        if not 0.0 <= self.target_decay < 1.0:
            raise UserError(f"distill.target_decay must be in [0, 1), got {self.target_decay}")
        if self.target_decay_start is not None and not 0.0 <= self.target_decay_start < 1.0:
            raise UserError(f"distill.target_decay_start must be in [0, 1) (or null: no ramp), got "
                            f"{self.target_decay_start}")
        if self.target_decay_ramp < 0 or (self.target_decay_ramp > 0) != (self.target_decay_start is not None):
            raise UserError(f"distill.target_decay_ramp ({self.target_decay_ramp}) and distill.target_decay_start "
                            f"({self.target_decay_start}) go together: a ramp of > 0 steps from a start rate, or "
                            f"neither (a constant mu = target_decay)")
        if self.lora_rank < 0:
            raise UserError(f"distill.lora_rank must be >= 0 (0: full distillation), got {self.lora_rank}")
        if self.lora_rank and self.guidance_embedding:
            raise UserError("distill.guidance_embedding with distill.lora_rank > 0: the w embedding is a new trainable "
                             "layer inside the frozen model; distil it fully (distill.lora_rank=0) or drop it")
        if self.lora_rank == 0 and self.lora_alpha is not None:
            raise UserError("distill.lora_alpha is set on a full-distillation config (lora_rank 0): set "
                             "distill.lora_rank > 0 for LCM-LoRA, or drop lora_alpha")

    def target_rate(self, step: int) -> float:
        """mu after `step` target updates: target_decay, or on the ramp the rate whose horizon 1 / (1 - mu) is the
        geometric interpolation of the start's and the end's (consistency training grows mu over training too)."""
        if self.target_decay_start is None or step >= self.target_decay_ramp:
            return self.target_decay
        start, end = 1.0 - self.target_decay_start, 1.0 - self.target_decay
        return 1.0 - start * (end / start) ** (step / self.target_decay_ramp)


@dataclass
class DMDConfig:
    """Distribution matching distillation; the `dmd:` section of a run config (train/train_dmd.py)."""

    teacher: str | None = None       # the frozen teacher (real score); generator and fake score start as it
    generator_init: str | None = None  # the generator starts as this checkpoint instead (same architecture, e.g. the
                                       # LCD student); the fake score still starts as the teacher
    generator_depth: int | None = None  # the generator's blocks, more than the teacher's: the extra ones start as
                                        # identity (models/pixart.py deepened), so it starts as the teacher (or
                                        # generator_init, which may also be such a deeper export when this is
                                        # its depth); None: the teacher's depth
    generator_steps: int = 1         # denoiser evaluations of the student: its timesteps are LCM's picks of that many
                                     # (1: 999; 2: 999, 499), so `--sampler lcm --steps N` samples it
    generator_timesteps: list[int] | None = None  # the student's timesteps instead of LCM's picks, descending from
                                     # T - 1, one per generator step (e.g. [999, 759, 499, 119]); an LCM sample section
                                     # at generator_steps draws them by default (sample.sampler_options.timesteps;
                                     # configs/schema.py), and one that draws others is refused
    real_guidance: float = 4.5       # CFG scale of the real score: eps_u + s (eps_c - eps_u), null caption; <= 1: off
    fake_updates: int = 5            # fake-score updates per generator update (DMD2's two time-scale rule)
    fake_lr: float | None = None     # learning rate of the fake score; None: train.lr
    t_min: float = 0.02              # the generator loss's noise levels: t ~ U[t_min T, t_max T)
    t_max: float = 0.98
    gan_weight: float = 0.0          # > 0: the generator's GAN loss weight (DMD2's SDXL run: 1e-3); 0: no GAN term
    gan_head_weight: float = 1e-2    # weight of the GAN head's loss within the fake-score update
    gan_t_max: float | None = None   # the GAN term's noise levels: t ~ U[t_min T, gan_t_max T) (low noise, where
                                     # a shape's outline is visible); None: t_max, as the DMD term's
    gan_pool: str = "mean"           # the head's logits: one per image from the middle tokens' mean (mean), or one
                                     # per token (tokens: a patch discriminator, each logit judging a patch)
    distribution_weight: float = 1.0  # weight of the distribution-matching term (0: the regression term alone)
    regression_weight: float = 0.0   # > 0: DMD's regression loss: the generator's image from a pair's noise
                                     # against the teacher's image from that noise (dmd.pairs), mean squared
    regression_edge_weight: float = 0.0  # > 0: the regression distance adds this times the squared distance of the
                                         # images' neighbouring-pixel differences (weights shape edges and corners)
    regression_feature_weight: float = 0.0  # > 0: the regression distance adds this times a teacher-feature
                                            # distance (diffusion/dmd.py TeacherFeatures): the frozen teacher's
                                            # unit-length tokens after each block, both images noised alike
    regression_feature_t: float = 0.3  # that term's timesteps: t ~ U[0, regression_feature_t T)
    regression_steps: str = "all"    # which generator steps the regression trains (generator_steps > 1): all (each
                                     # pair's step drawn as the DMD term's, earlier steps run and re-noised without
                                     # gradient) | first (only the first step's output, from the pair's noise) | own
                                     # (each row the step at its own timestep: pairs made with --start-timesteps)
    regression_step_weights: list[float] | None = None  # one weight per generator step for the regression rows
                                     # of that step (modes all and own); None: all 1. The later steps' squared
                                     # errors are several times smaller than the first's, so uniform weights give
                                     # the steps that draw the final image the least of the gradient
    pairs: str | None = None         # noise-image pairs of the teacher (tools/make_ode_pairs.py)
    matching_steps: int | None = None  # the distribution-matching term (and the fake score's samples) on the outputs
                                       # of the generator's first this many steps; None: every step

    @property
    def reads_fake_score(self) -> bool:
        """Whether a generator term reads the fake score (the DMD term, the GAN term); if not, none is trained."""
        return self.distribution_weight > 0 or self.gan_weight > 0

    def check(self, num_train_steps: int) -> None:
        """Raise a UserError naming the key for an inconsistent section (before anything is loaded)."""
        if not self.teacher:
            raise UserError("dmd.teacher is not set: the checkpoint of the teacher to distil (any format)")
        self.validate()
        if not 1 <= self.generator_steps <= 50 or num_train_steps % 50:
            raise UserError(f"dmd.generator_steps must be in 1..50 (the generator's timesteps are picks of the "
                            f"50-step LCM grid of the {num_train_steps}-step schedule), got {self.generator_steps}")
        if self.generator_timesteps is not None:
            from diffusion.samplers.lcm import check_timesteps  # torch: only when a run is checked

            try:
                check_timesteps(self.generator_timesteps, self.generator_steps, num_train_steps)
            except UserError as e:
                raise UserError(f"dmd.generator_timesteps: {e}") from None
        weights = self.regression_step_weights
        if weights is not None and len(weights) != self.generator_steps:
            raise UserError(f"dmd.regression_step_weights has {len(weights)} weights for a {self.generator_steps}-step "
                            f"generator: give one per step (first step first), e.g. "
                            f"{[1.0] * self.generator_steps}")
        if self.matching_steps is not None and not 1 <= self.matching_steps <= self.generator_steps:
            raise UserError(f"dmd.matching_steps must be in 1..dmd.generator_steps={self.generator_steps} (the DMD "
                            f"term on the outputs of the generator's first that many steps), or null for every step; "
                            f"got {self.matching_steps}")

    def validate(self) -> None:
        """Checks of this section alone (the loader calls it; check() adds the schedule's)."""
        if self.fake_updates < 1:
            raise UserError(f"dmd.fake_updates must be >= 1 (fake-score updates per generator update; DMD2 uses 5), "
                            f"got {self.fake_updates}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise UserError(f"dmd.t_min and dmd.t_max must satisfy 0 <= t_min < t_max <= 1, got {self.t_min} and "
                            f"{self.t_max}")
        for key in ("real_guidance", "gan_weight", "gan_head_weight", "distribution_weight", "regression_weight",
                    "regression_edge_weight", "regression_feature_weight"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise UserError(f"dmd.{key} must be a finite number >= 0, got {value}")
        if self.gan_t_max is not None and not self.t_min < self.gan_t_max <= 1.0:
            raise UserError(f"dmd.gan_t_max must be in (dmd.t_min={self.t_min}, 1] (or null: dmd.t_max), got "
                            f"{self.gan_t_max}")
        if self.gan_pool not in ("mean", "tokens"):
            raise UserError(f"dmd.gan_pool must be 'mean' (one logit per image) or 'tokens' (one per token, a patch "
                            f"discriminator), got {self.gan_pool!r}")
        if self.regression_steps not in ("all", "first", "own"):
            raise UserError(f"dmd.regression_steps must be 'all' (every generator step, backward simulation), "
                            f"'first' (the first step only) or 'own' (each pair the step at its own timestep), got "
                            f"{self.regression_steps!r}")
        if self.fake_lr is not None and not (math.isfinite(self.fake_lr) and self.fake_lr > 0):
            raise UserError(f"dmd.fake_lr must be > 0 (or null: train.lr), got {self.fake_lr}")
        if self.regression_weight > 0 and not self.pairs:
            raise UserError(f"dmd.regression_weight={self.regression_weight} needs the teacher's noise-image pairs: "
                            f"make them with python tools/make_ode_pairs.py OUT.safetensors --config TEACHER_CONFIG "
                            f"and set dmd.pairs=OUT.safetensors")
        if self.pairs and self.regression_weight == 0:
            raise UserError(f"dmd.pairs={self.pairs} is set but dmd.regression_weight is 0, so the pairs would not "
                            f"be used: set dmd.regression_weight (DMD used 0.25) or drop dmd.pairs")
        if self.regression_edge_weight > 0 and self.regression_weight == 0:
            raise UserError(f"dmd.regression_edge_weight={self.regression_edge_weight} weights an edge term of the "
                            f"regression distance, but dmd.regression_weight is 0 (no regression term): set "
                            f"dmd.regression_weight with dmd.pairs, or drop dmd.regression_edge_weight")
        if self.regression_feature_weight > 0 and self.regression_weight == 0:
            raise UserError(f"dmd.regression_feature_weight={self.regression_feature_weight} adds a teacher-feature "
                            f"term to the regression distance, but dmd.regression_weight is 0 (no regression term): "
                            f"set dmd.regression_weight with dmd.pairs, or drop dmd.regression_feature_weight")
        if not 0.0 < self.regression_feature_t <= 1.0:
            raise UserError(f"dmd.regression_feature_t must be in (0, 1] (the feature term's timesteps are drawn "
                            f"from [0, regression_feature_t T)), got {self.regression_feature_t}")
        if self.regression_step_weights is not None:
            weights = self.regression_step_weights
            if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
                raise UserError(f"dmd.regression_step_weights must be finite numbers >= 0, not all 0, got {weights}")
            if self.regression_weight == 0 or self.regression_steps == "first":
                raise UserError(f"dmd.regression_step_weights={weights} weights the regression rows of each "
                                f"generator step, but " + ("dmd.regression_weight is 0 (no regression term)"
                                                           if self.regression_weight == 0 else
                                                           "dmd.regression_steps=first trains the first step only")
                                + ": set dmd.regression_steps to own or all with dmd.regression_weight > 0, or drop "
                                  "dmd.regression_step_weights")
        if self.distribution_weight == 0 and self.regression_weight == 0:
            raise UserError("dmd.distribution_weight and dmd.regression_weight are both 0: nothing trains the "
                            "generator; set one of them > 0")
