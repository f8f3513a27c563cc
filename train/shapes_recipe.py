"""The shipped shapes models, end to end on a laptop CPU: data, text encoder, features, training, evaluation, and
shipping into weights/shapes/ with a manifest.

    python train/shapes_recipe.py teacher                   # about 2 hours on 2 CPU cores
    python train/shapes_recipe.py student                   # distils the shipped teacher (after `teacher`)
    python train/shapes_recipe.py teacher --dry-run         # print the commands only
    python train/shapes_recipe.py teacher --set train.device=cuda --set train.batch_size=256   # on a GPU

Each stage is an ordinary command of this project, printed before it runs and recorded in the manifest, and is
skipped when its output exists, so an interrupted recipe continues where it stopped (training resumes exactly;
a run folder of a stage's train.name trained with another config stops the recipe rather than being shipped):

  data      tools/make_synthetic_data.py: 30,000 scenes of 32x32 (60% one shape), shapes apart and clear of cell borders
  t5        tools/random_weights.py t5: a frozen random 2-layer T5 of width 64 whose tokenizer has one piece per
            caption word, plus known_words.txt (prompts with other words get a warning)
  features  tools/extract_features.py: the pixel "latents" and T5 features the trainer reads
  train     train/train.py --config shapes_teacher: stage one, 3,500 steps (colour, place, size, count)
  base      its EMA weights in fp16: work/teacher-base.safetensors (when present, stage one is not run again)
  refine    train/train.py --config shapes_teacher_refine from the base: stage two, 8,000 steps at lr 6e-4 on the
            mid-noise timesteps where an object's kind is decided, edges weighted
  ship      stage two's EMA weights in fp16 and the T5 folder into --ship, hashed into MANIFEST.json
  evaluate  tools/evaluate.py model on the held-out captions, with the shipped files; scores go into the manifest

`student` runs train/train_lcm.py --config lcm_shapes on the teacher's cache, ships student.safetensors (fp16) and
evaluates it with LCM in 4 steps. `dmd` (after `student`) makes the teacher's noise-image pairs
(tools/make_ode_pairs.py), trains train/train_dmd.py --config dmd_shapes from the shipped student on them (a
one-step generator, kept in fp16 as work/shapes/dmd-1step.safetensors), trains that on as a two-step generator
(--config dmd_shapes_2step), ships it as dmd_student.safetensors (fp16 with the blocks' linear weights stored in
int8 per row, loaded as float: the 30 MB weights budget) and evaluates it in two steps and in one. `dmd4` (after
`student`) extends the pairs with rows from the teacher's image re-noised to 639, 339 and 119, trains the LCD student
as a four-step generator at 999, 639, 339, 119 on the regression term alone (configs/dmd_shapes_4step_regression.yaml)
and then with the DMD term (configs/dmd_shapes_4step.yaml), and ships dmd4_student.safetensors (the same storage),
the default of sample/sample.py, evaluated in four steps.
`controlnet` extracts the edge-map cache, trains the
branch of configs/controlnet_shapes.yaml on the shipped teacher (captions partly rewritten to contradict the edge
map), ships it (controlnet.safetensors, fp16) and evaluates it steering the teacher and the student on agreeing,
conflicting and colour-only captions. The design ablation behind its choices is tools/controlnet_ablation.py.
"""

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("shapes_recipe")


@dataclass
class Recipe:
    """Everything the recipe decides besides the preset (configs/shapes_teacher.yaml)."""

    work: Path                                  # data, encoder, cache, runs, evaluations
    ship: Path                                  # where the shipped files go (weights/shapes)
    overrides: list[str] = field(default_factory=list)  # --set passed to training
    num_images: int = 30_000
    data_seed: int = 0
    object_weights: str = "3,1,1"               # 60% one shape, 20% two, 20% three
    min_gap: float = 0.06
    cell_margin: float = 0.03
    t5_width: int = 64
    t5_layers: int = 2
    t5_vocab: int = 400
    config: str = "shapes_teacher"
    refine_config: str = "shapes_teacher_refine"

    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def t5(self) -> Path:
        return self.work / "t5"

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    def paths(self) -> list[str]:
        """--set arguments pointing the preset at this recipe's work folder."""
        return [f"text_encoder.path={self.t5}", f"data.cache_dir={self.cache}", f"train.runs_dir={self.runs}"]



def python(script: str, *args) -> list[str]:
    return [sys.executable, str(ROOT / script), *map(str, args)]


def sets(assignments: list[str]) -> list[str]:
    return [arg for a in assignments for arg in ("--set", a)]


def run(cmd: list[str], dry_run: bool) -> None:
    shown = " ".join(str(c).replace(str(ROOT) + "/", "") for c in cmd)
    log.info("$ %s", shown)
    if not dry_run:
        subprocess.run(cmd, check=True, cwd=ROOT)


def finished_run(runs: Path, name: str, steps: int) -> tuple[Path | None, bool]:
    """(the newest run folder of train.name `name` in runs, whether it reached `steps`)."""
    found = sorted(runs.glob(f"*-{name}")) if runs.is_dir() else []
    if not found:
        return None, False
    pointer = found[-1] / "checkpoints" / "latest.txt"
    step = int(pointer.read_text().strip()[len("step_"):-len(".pt")]) if pointer.is_file() else 0
    return found[-1], step >= steps


class Stages:
    """Runs stages in order, skipping the finished ones, and records how long each took."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, skip: bool, cmd: list[str] | None = None, fn=None) -> None:
        if skip:
            log.info("[%s] done already, skipped", name)
            return
        start = time.perf_counter()
        if cmd is not None:
            run(cmd, self.dry_run)
        if fn is not None and not self.dry_run:
            fn()
        self.seconds[name] = round(time.perf_counter() - start, 1)


def train_stage(stages: Stages, recipe: Recipe, script: str, config: str, overrides: list[str],
                skip: bool = False) -> Path:
    """Train (or resume, or skip when finished or when `skip`) the run of a preset; returns its run folder."""
    from configs import Config, load_config

    cfg = load_config(Config, config, overrides)
    run_dir, done = finished_run(recipe.runs, cfg.train.name, cfg.train.steps)
    if run_dir is not None and not skip:
        check_same_config(run_dir, cfg)
    done = done or skip
    cmd = (python(script, "--resume", run_dir, *sets([f"train.steps={cfg.train.steps}"])) if run_dir is not None
           else python(script, "--config", config, *sets(overrides)))
    stages(f"train {config}", done, cmd)
    run_dir, _ = finished_run(recipe.runs, cfg.train.name, cfg.train.steps)
    return run_dir if run_dir is not None else recipe.runs / f"NNNNN-{cfg.train.name}"


def check_same_config(run_dir: Path, cfg) -> None:
    """A run folder of the stage's train.name is resumed or shipped only when it was trained with the config the
    recipe would train now (train.steps aside, which a resume may raise); otherwise the recipe stops and says so."""
    from configs import Config, load_config, to_dict
    from engine.state import config_differences

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return  # a run stopped before it wrote its config: resuming it fails with the loop's own message
    differ = [d for d in config_differences(to_dict(load_config(Config, saved_file)), to_dict(cfg))
              if not d.startswith("train.steps:")]
    if differ:
        more = f"; {len(differ) - 4} more" if len(differ) > 4 else ""
        raise SystemExit(f"error: {run_dir} has this stage's train.name but another config (in the folder -> now: "
                         f"{'; '.join(differ[:4])}{more}): the recipe would resume or ship it as this stage; move "
                         f"that folder out of {run_dir.parent}, then run the recipe again")


def evaluate_stage(stages: Stages, recipe: Recipe, config: str, overrides: list[str], name: str) -> Path:
    out = recipe.work / "eval" / name
    stages(f"evaluate {name}", False, python("tools/evaluate.py", "model", "--config", config, *sets(overrides),
                                              "--out", out, "--no-progress"))
    return out


def teacher(recipe: Recipe, dry_run: bool) -> None:
    stages = Stages(dry_run)
    stages("data", (recipe.data / "metadata.jsonl").is_file(), python(
        "tools/make_synthetic_data.py", recipe.data, "--num", recipe.num_images, "--seed", recipe.data_seed,
        "--sizes", "32x32", "--max-objects", 3, "--object-weights", recipe.object_weights,
        "--min-gap", recipe.min_gap, "--cell-margin", recipe.cell_margin, "--no-progress"))
    stages("t5", (recipe.t5 / "config.json").is_file(), python(
        "tools/random_weights.py", "t5", recipe.t5, "--d-model", recipe.t5_width, "--layers", recipe.t5_layers,
        "--vocab-size", recipe.t5_vocab, "--corpus", recipe.data))
    stages("features", (recipe.cache / "index.jsonl").is_file(), python(
        "tools/extract_features.py", recipe.data, recipe.cache, "--config", recipe.config, "--base-size", 32,
        "--autoencoder", "pixel", "--batch-size", 256, "--no-progress", *sets(recipe.paths())))
    # Stage one (shapes_teacher): colour, place, size and count. Its EMA, in fp16 as it would ship, starts stage two
    # (shapes_teacher_refine), which trains on the mid-noise steps where an object's kind is decided.
    base = recipe.work / "teacher-base.safetensors"
    base_run = train_stage(stages, recipe, "train/train.py", recipe.config, recipe.paths() + recipe.overrides,
                           skip=base.is_file())
    stages("ship base", base.is_file(), fn=lambda: ship(base_run / "ema.safetensors", base))
    run_dir = train_stage(stages, recipe, "train/train.py", recipe.refine_config,
                          recipe.paths() + [f"train.init_from={base}"] + recipe.overrides)
    stages("ship teacher", False, fn=lambda: ship(run_dir / "ema.safetensors", recipe.ship / "teacher.safetensors",
                                                  t5=recipe.t5, t5_target=recipe.ship / "t5"))
    shipped = [f"sample.checkpoint={recipe.ship / 'teacher.safetensors'}", f"text_encoder.path={recipe.ship / 't5'}"]
    out = evaluate_stage(stages, recipe, recipe.config, shipped, "teacher")
    if not dry_run:
        command = "python train/shapes_recipe.py teacher" + "".join(f" --set {o}" for o in recipe.overrides)
        t5_files = sorted(p.relative_to(recipe.ship).as_posix() for p in (recipe.ship / "t5").rglob("*")
                          if p.is_file())
        update_manifest(recipe, "t5", t5_files, command, None, None, {
            "what": f"frozen random T5 encoder, {recipe.t5_layers} layers of width {recipe.t5_width}; sentencepiece "
                    f"tokenizer ({recipe.t5_vocab} pieces) with one piece per training-caption word; known_words.txt"})
        update_manifest(recipe, "teacher", ["teacher.safetensors"], command, recipe.refine_config, out, {
            "what": "PixArt teacher (fp16 EMA weights of stage two, shapes_teacher_refine, trained from the fp16 "
                    "EMA of stage one, shapes_teacher); DPM-Solver++ 20 steps with CFG",
            "data": {"images": recipe.num_images, "seed": recipe.data_seed, "object_weights": recipe.object_weights,
                     "min_gap": recipe.min_gap, "cell_margin": recipe.cell_margin, "size": "32x32"},
            "stage_seconds": stages.seconds})
    log.info("stage seconds: %s", stages.seconds)


def distil(recipe: Recipe, dry_run: bool, stage: str, who: str, script: str, config: str, teacher_key: str,
           weights: str, name: str, what: str, extra: tuple[str, ...] = (), stages: Stages | None = None,
           also_evaluate: dict[str, str] | None = None, storage: str = "fp16",
           average_steps: tuple[int, ...] = ()) -> None:
    """Distil the shipped teacher on its feature cache with `script --config config` (needs `teacher` first; `extra`:
    more --set of the training), ship the run's `weights` file as NAME.safetensors (fp16, or int8-weights: see
    ship), evaluate it with `config` (and with each config of `also_evaluate`, recorded under its key) and record it
    in the manifest. average_steps: ship instead the mean of the EMA weights of the run's training checkpoints at
    those steps (tools/average_checkpoints.py, written as the run's `weights` file, with the metadata of the run's
    own export, ema.safetensors)."""
    stages = stages or Stages(dry_run)
    shipped = (recipe.ship / "teacher.safetensors").is_file() and (recipe.cache / "index.jsonl").is_file()
    if not dry_run and not shipped:
        raise SystemExit(f"error: {who} distils the shipped teacher on its feature cache: run "
                         f"`python train/shapes_recipe.py teacher` first (needs {recipe.ship / 'teacher.safetensors'} "
                         f"and {recipe.cache})")
    target = recipe.ship / f"{name}.safetensors"
    run_dir = train_stage(stages, recipe, script, config, distil_paths(recipe, teacher_key, extra) + recipe.overrides)
    if average_steps:
        stages("average checkpoints", False, python(
            "tools/average_checkpoints.py", run_dir / weights,
            *[run_dir / "checkpoints" / f"step_{step:08d}.pt" for step in average_steps],
            "--metadata-from", run_dir / "ema.safetensors"))  # what the task records (a generator's timesteps)
    stages(f"ship {name.replace('_', ' ')}", False, fn=lambda: ship(run_dir / weights, target, storage=storage))
    shipped_files = [f"sample.checkpoint={target}", f"text_encoder.path={recipe.ship / 't5'}"]
    out = evaluate_stage(stages, recipe, config, shipped_files, name)
    others = {key: evaluate_stage(stages, recipe, other, shipped_files, f"{name}-{other}")
              for key, other in (also_evaluate or {}).items()}
    if not dry_run:
        command = f"python train/shapes_recipe.py {stage}" + "".join(f" --set {o}" for o in recipe.overrides)
        update_manifest(recipe, name, [target.name], command, config, out,
                        {"what": what, **{key: read_evaluation(o) for key, o in others.items()},
                         "stage_seconds": stages.seconds})
    log.info("stage seconds: %s", stages.seconds)


def distil_paths(recipe: Recipe, teacher_key: str, extra: tuple[str, ...]) -> list[str]:
    """--set arguments of a distillation: the shipped teacher and T5, the recipe's cache and runs, then `extra`."""
    return [f"{teacher_key}={recipe.ship / 'teacher.safetensors'}", f"text_encoder.path={recipe.ship / 't5'}",
            f"data.cache_dir={recipe.cache}", f"train.runs_dir={recipe.runs}", *extra]


def student(recipe: Recipe, dry_run: bool) -> None:
    """The LCD student: latent consistency distillation of the shipped teacher (configs/lcm_shapes.yaml)."""
    distil(recipe, dry_run, "student", "the student", "train/train_lcm.py", "lcm_shapes", "distill.teacher",
           "weights.safetensors", "student", "PixArt-delta student (fp16): latent consistency distillation of the "
           "teacher; LCM 4 steps, no guidance")


DMD_WHAT = ("two-step student (fp16 EMA of the generator, its block linear weights stored in int8 per row: "
            "int8-weights, loaded as float): the LCD student trained on DMD's regression term (the "
            "teacher's noise-image pairs) and distribution matching at a quarter weight as a one-step generator, then "
            "on both as a two-step generator (every step regressed); LCM sampler, 2 steps (999, 499) or 1 (999), "
            "no guidance")


def dmd(recipe: Recipe, dry_run: bool) -> None:
    """The few-step DMD student (configs/dmd_shapes.yaml, then configs/dmd_shapes_2step.yaml): the shipped LCD
    student (needs `student` first) trained further on DMD's regression term, the teacher's own noise-image pairs
    (made here, DPM-Solver 20 with CFG 3 from 6,000 training captions), with the DMD term as the preset weighs it,
    as a one-step generator; its EMA in fp16 (work/shapes/dmd-1step.safetensors) is trained on as a two-step generator,
    whose EMA is shipped (int8-weights) and evaluated in two steps (LCM's 999 and 499) and in one (999), no guidance."""
    stages = Stages(dry_run)
    student_file = shipped_student(recipe, dry_run, "the DMD student")
    pairs = teacher_pairs(stages, recipe)
    one_step = recipe.work / "dmd-1step.safetensors"
    paths = distil_paths(recipe, "dmd.teacher", (f"dmd.pairs={pairs}", f"dmd.generator_init={student_file}"))
    run_dir = train_stage(stages, recipe, "train/train_dmd.py", "dmd_shapes", paths + recipe.overrides,
                          skip=one_step.is_file())
    stages("keep the one-step generator", one_step.is_file(), fn=lambda: ship(run_dir / "ema.safetensors", one_step))
    distil(recipe, dry_run, "dmd", "the DMD student", "train/train_dmd.py", "dmd_shapes_2step", "dmd.teacher",
           "ema.safetensors", "dmd_student", DMD_WHAT, stages=stages,
           extra=(f"dmd.pairs={pairs}", f"dmd.generator_init={one_step}"),
           also_evaluate={"evaluation_one_step": "dmd_shapes"}, storage="int8-weights")


def shipped_student(recipe: Recipe, dry_run: bool, who: str) -> Path:
    """The shipped LCD student a DMD stage starts from; stops the recipe when `student` has not made it."""
    student_file = recipe.ship / "student.safetensors"
    if not dry_run and not student_file.is_file():
        raise SystemExit(f"error: {who} starts from the shipped LCD student: run `python "
                         f"train/shapes_recipe.py student` first (needs {student_file})")
    return student_file


def make_pairs(stages: Stages, recipe: Recipe, name: str, pairs: Path, *args) -> None:
    """tools/make_ode_pairs.py with the shipped teacher on the recipe's cache (skipped when `pairs` exists)."""
    stages(name, pairs.is_file(), python(
        "tools/make_ode_pairs.py", pairs, "--config", recipe.config, "--batch-size", 250, *args, "--no-progress",
        *sets([f"sample.checkpoint={recipe.ship / 'teacher.safetensors'}", f"data.cache_dir={recipe.cache}"])))


def teacher_pairs(stages: Stages, recipe: Recipe) -> Path:
    """The teacher's noise-image pairs from 6,000 training captions (DPM-Solver 20, CFG 3), made once."""
    pairs = recipe.work / "pairs.safetensors"
    make_pairs(stages, recipe, "pairs", pairs, "--num", 6000)
    return pairs


DMD4_WHAT = ("four-step student, the default of sample/sample.py (fp16 mean of four EMA checkpoints of the generator, "
             "its block linear weights stored in int8 per row: int8-weights, loaded as float): the LCD student "
             "trained as a four-step generator at timesteps 999, 639, 339, 119, on the regression term alone (each "
             "step on the teacher's pairs from its own timestep, the last step weighted 28 of 34), then with the DMD "
             "term at weight 1, real score guided at 3, then 400 steps more on regression rows from its own states "
             "(on-policy), shipped as the mean of the EMA at steps 100-400; LCM sampler at those timesteps, no "
             "guidance")


def dmd4(recipe: Recipe, dry_run: bool) -> None:
    """The four-step student, three stages (configs/dmd_shapes_4step_regression.yaml, configs/dmd_shapes_4step.yaml,
    configs/dmd_shapes_4step_onpolicy.yaml): the shipped LCD student (needs `student` first) trained as a four-step
    generator at 999, 639, 339, 119 on the teacher's pairs (made here, or `dmd`'s) plus rows from the teacher's image
    re-noised to 639, 339 and 119, first on the regression term alone (its EMA kept as
    work/shapes/dmd4-regression.safetensors), then with the DMD term (its EMA kept as work/shapes/dmd4-stage2
    .safetensors, and in int8-weights storage as dmd4-stage2-int8w.safetensors), then 400 steps more on rows that
    start from that student's own states (make_ode_pairs.py --student); the mean of stage three's four EMA checkpoints
    is shipped in int8-weights storage and evaluated in four steps."""
    stages = Stages(dry_run)
    student_file = shipped_student(recipe, dry_run, "the four-step student")
    pairs = teacher_pairs(stages, recipe)
    pairs4 = recipe.work / "pairs4_639.safetensors"
    make_pairs(stages, recipe, "pairs from 639, 339, 119", pairs4, "--extend", pairs,
               "--start-timesteps", "639,339,119")
    regression = recipe.work / "dmd4-regression.safetensors"
    paths = distil_paths(recipe, "dmd.teacher", (f"dmd.pairs={pairs4}", f"dmd.generator_init={student_file}"))
    run_dir = train_stage(stages, recipe, "train/train_dmd.py", "dmd_shapes_4step_regression",
                          paths + recipe.overrides, skip=regression.is_file())
    stages("keep the regression generator", regression.is_file(),
           fn=lambda: shutil.copyfile(run_dir / "ema.safetensors", regression))  # fp32, as stage two reads it
    stage2, stage2_stored = recipe.work / "dmd4-stage2.safetensors", recipe.work / "dmd4-stage2-int8w.safetensors"
    paths = distil_paths(recipe, "dmd.teacher", (f"dmd.pairs={pairs4}", f"dmd.generator_init={regression}"))
    run_dir = train_stage(stages, recipe, "train/train_dmd.py", "dmd_shapes_4step", paths + recipe.overrides,
                          skip=stage2_stored.is_file())

    def keep_stage_two() -> None:
        shutil.copyfile(run_dir / "ema.safetensors", stage2)  # fp32, as stage three starts from it
        ship(run_dir / "ema.safetensors", stage2_stored, storage="int8-weights")  # the on-policy pairs' student

    stages("keep the stage-two generator", stage2_stored.is_file(), fn=keep_stage_two)
    on_policy = recipe.work / "pairs4_onpolicy.safetensors"
    make_pairs(stages, recipe, "on-policy pairs from 639, 339, 119", on_policy, "--extend", pairs,
               "--start-timesteps", "639,339,119", "--student", stage2_stored)
    distil(recipe, dry_run, "dmd4", "the four-step student", "train/train_dmd.py", "dmd_shapes_4step_onpolicy",
           "dmd.teacher", "averaged.safetensors", "dmd4_student", DMD4_WHAT, stages=stages,
           extra=(f"dmd.pairs={on_policy}", f"dmd.generator_init={stage2}"), storage="int8-weights",
           average_steps=(100, 200, 300, 400))


CONTROL_BUDGET_BYTES = 3_200_000  # what the 20 MB budget leaves for a branch beside teacher, student and T5


def controlnet(recipe: Recipe, dry_run: bool) -> None:
    """Train the branch of configs/controlnet_shapes.yaml on the teacher's edge maps (its captions partly rewritten
    to contradict the map, so that the map, not the caption, decides kind and place), ship it, and evaluate it
    steering the teacher (DPM-Solver 20, CFG) and the student (LCM 4, no guidance) on the agreeing, conflicting and
    colour-only sets. The design ablation is its own command: tools/controlnet_ablation.py."""
    stages = Stages(dry_run)
    edge_cache = recipe.work / "cache-edge"
    t5 = f"text_encoder.path={recipe.ship / 't5'}"
    stages("edge features", (edge_cache / "index.jsonl").is_file(), python(
        "tools/extract_features.py", recipe.data, edge_cache, "--config", recipe.config, "--base-size", 32,
        "--autoencoder", "pixel", "--control", "edge", "--batch-size", 256, "--no-progress", *sets([t5])))
    config = "controlnet_shapes"
    paths = [f"control.base={recipe.ship / 'teacher.safetensors'}", t5, f"data.cache_dir={edge_cache}",
             f"train.runs_dir={recipe.runs}"]
    run_dir = train_stage(stages, recipe, "train/train_controlnet.py", config, paths + recipe.overrides)
    source = run_dir / "weights.safetensors"
    if not dry_run and source.stat().st_size / 2 > CONTROL_BUDGET_BYTES:
        raise SystemExit(f"error: the branch {source} takes {source.stat().st_size / 2e6:.1f} MB in fp16, more than "
                         f"the {CONTROL_BUDGET_BYTES / 1e6:.1f} MB the shipped-weights budget leaves for it: train "
                         f"fewer copied blocks (--set control.num_blocks=N)")
    stages("ship controlnet", False, fn=lambda: ship(source, recipe.ship / "controlnet.safetensors"))
    branch = f"control.checkpoint={recipe.ship / 'controlnet.safetensors'}"
    evaluation = [o for o in recipe.overrides if o.startswith("evaluation.")]  # e.g. fewer scenes
    outs = {}
    for name, evaluated, extra in (("controlnet-teacher", "controlnet_shapes", []),
                                   ("controlnet-student", "lcm_shapes", ["control.check_base=false"])):
        out = recipe.work / "eval" / name
        stages(f"evaluate {name}", False, python("tools/evaluate.py", "model", "--config", evaluated, "--control",
                                                 *sets([branch, t5, *extra, *evaluation]), "--out", out,
                                                 "--no-progress"))
        outs[name] = out
    if dry_run:
        return
    from configs import Config, load_config

    cfg = load_config(Config, config, paths + recipe.overrides)
    command = "python train/shapes_recipe.py controlnet" + "".join(f" --set {o}" for o in recipe.overrides)
    teacher_results = json.loads(sorted(outs["controlnet-teacher"].iterdir())[-1].joinpath("results.json")
                                 .read_text())
    update_manifest(recipe, "controlnet", ["controlnet.safetensors"], command, config, outs["controlnet-student"], {
        "what": f"ControlNet branch (fp16) of the teacher, design {cfg.control.design}, N = {cfg.control.num_blocks}, "
                f"{cfg.train.steps} steps at batch {cfg.train.batch_size} on the edge maps, captions contradicting "
                f"the map at {cfg.control.caption_conflict_prob:g} and naming only the colour at "
                f"{cfg.control.caption_colour_only_prob:g}; steers the student too (control.check_base=false)",
        "evaluation_teacher": {"edge_f1": teacher_results.get("edge_f1"),
                               "control_sets": teacher_results.get("control_sets")},
        "stage_seconds": stages.seconds})
    log.info("shipped %s; stage seconds: %s", recipe.ship / "controlnet.safetensors", stages.seconds)


def ship(source: Path, target: Path, t5: Path | None = None, t5_target: Path | None = None,
         storage: str = "fp16") -> None:
    """fp16 weights (half the bytes; the evaluation runs on exactly these), and the T5 folder when given; the
    manifest's hashes follow at once (shipped files are verified on load, also by the evaluation that follows).
    storage "int8-weights" then stores the fp16 blocks' linear weights in int8 with per-row scales (a little over
    half of fp16; they load as float weights: models/quantize.py)."""
    from safetensors import safe_open

    from common.files import atomic_dir, atomic_path
    from common.safetensors_file import save_file

    with safe_open(str(source), framework="pt") as f:
        tensors = {k: f.get_tensor(k).half() for k in f.keys()}
        metadata = f.metadata()
    if storage == "int8-weights":
        from models.checkpoint import peek
        from models.pixart import build_pixart
        from models.quantize import store_int8_weights

        tensors = store_int8_weights(tensors, build_pixart(peek(source).config, device="meta"))
        metadata = {**metadata, "quantization": storage}
    with atomic_path(target) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    if t5 is not None:
        with atomic_dir(t5_target, replace_existing=True) as tmp:
            shutil.copytree(t5, tmp, dirs_exist_ok=True)
    log.info("shipped %s (%s)%s", target, storage, f" and {t5_target}" if t5 is not None else "")
    from models.shipped import MANIFEST_NAME, read_manifest, write_manifest

    manifest = target.parent / MANIFEST_NAME
    if manifest.is_file():  # rehash what it lists (a re-shipped file keeps its entry until the stage ends)
        write_manifest(target.parent, read_manifest(manifest).get("models", {}))


def read_evaluation(eval_dir: Path) -> dict:
    """The manifest's record of the newest evaluation in `eval_dir` (tools/evaluate.py's results.json)."""
    results = json.loads(sorted(eval_dir.iterdir())[-1].joinpath("results.json").read_text())
    return {k: results[k] for k in ("sampler", "steps", "guidance", "groups", "frechet_distance", "real_images",
                                    "seconds_per_image") if k in results}


def update_manifest(recipe: Recipe, name: str, files: list[str], command: str, config: str | None,
                    eval_dir: Path | None, extra: dict) -> None:
    """Add or replace one model's entry of the shipped manifest (and rehash every listed file)."""
    from models.shipped import MANIFEST_NAME, read_manifest, write_manifest

    manifest = recipe.ship / MANIFEST_NAME
    models = read_manifest(manifest).get("models", {}) if manifest.is_file() else {}
    entry = {"files": files, "command": command, **extra}
    if config is not None:
        entry["config"] = f"configs/{config}.yaml"
    if eval_dir is not None:
        entry["evaluation"] = read_evaluation(eval_dir)
    models[name] = entry
    log.info("manifest %s", write_manifest(recipe.ship, models))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["teacher", "student", "dmd", "dmd4", "controlnet"],
                        help="which shipped model to make (the students, LCD and DMD, distil the shipped teacher; the "
                             "ControlNet branch steers it)")
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "shapes", help="working folder (not shipped)")
    parser.add_argument("--ship", type=Path, default=ROOT / "weights" / "shapes", help="folder of shipped weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training config value, e.g. --set train.device=cuda (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    recipe = Recipe(work=args.work.resolve(), ship=args.ship.resolve(), overrides=args.overrides)
    start = time.perf_counter()
    try:
        stage = {"teacher": teacher, "student": student, "dmd": dmd, "dmd4": dmd4, "controlnet": controlnet}
        stage[args.what](recipe, args.dry_run)
    except subprocess.CalledProcessError as e:
        log.error("error: a stage failed (exit %d): %s; fix it and run the recipe again: finished stages are "
                  "skipped and training resumes", e.returncode, " ".join(map(str, e.cmd)))
        return 2
    log.info("recipe done in %.1f minutes", (time.perf_counter() - start) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
