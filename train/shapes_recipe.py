"""The shipped shapes models, end to end on a laptop CPU: data, text encoder, features, training, evaluation, and
shipping into weights/shapes/ with a manifest.

    python train/shapes_recipe.py teacher                   # about 1.7 hours on 2 CPU cores
    python train/shapes_recipe.py teacher --dry-run         # print the commands only
    python train/shapes_recipe.py teacher --set train.device=cuda --set train.batch_size=256   # on a GPU

Each stage is an ordinary command of this project, printed before it runs and recorded in the manifest, and is
skipped when its output exists, so an interrupted recipe continues where it stopped (training resumes exactly):

  data      tools/make_synthetic_data.py: 30,000 scenes of 32x32 (60% one shape), shapes apart and clear of cell borders
  t5        tools/random_weights.py t5: a frozen random 2-layer T5 of width 64 whose tokenizer has one piece per
            caption word, plus known_words.txt (prompts with other words get a warning)
  features  tools/extract_features.py: the pixel "latents" and T5 features the trainer reads
  train     train/train.py --config shapes_teacher
  ship      the EMA weights in fp16 and the T5 folder into --ship, hashed into MANIFEST.json
  evaluate  tools/evaluate.py model on the held-out captions, with the shipped files; scores go into the manifest
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


def finished_run(recipe: Recipe, steps: int) -> tuple[Path | None, bool]:
    """(the recipe's training run folder if any, whether it reached `steps`)."""
    runs = sorted(recipe.runs.glob("*-shapes-teacher")) if recipe.runs.is_dir() else []
    if not runs:
        return None, False
    run_dir = runs[-1]
    pointer = run_dir / "checkpoints" / "latest.txt"
    step = int(pointer.read_text().strip()[len("step_"):-len(".pt")]) if pointer.is_file() else 0
    return run_dir, step >= steps


def teacher(recipe: Recipe, dry_run: bool) -> None:
    from configs import Config, load_config

    timings = {}

    def stage(name: str, skip: bool, cmd: list[str] | None = None, fn=None) -> None:
        if skip:
            log.info("[%s] done already, skipped", name)
            return
        start = time.perf_counter()
        if cmd is not None:
            run(cmd, dry_run)
        if fn is not None and not dry_run:
            fn()
        timings[name] = round(time.perf_counter() - start, 1)

    stage("data", (recipe.data / "metadata.jsonl").is_file(), python(
        "tools/make_synthetic_data.py", recipe.data, "--num", recipe.num_images, "--seed", recipe.data_seed,
        "--sizes", "32x32", "--max-objects", 3, "--object-weights", recipe.object_weights,
        "--min-gap", recipe.min_gap, "--cell-margin", recipe.cell_margin, "--no-progress"))
    stage("t5", (recipe.t5 / "config.json").is_file(), python(
        "tools/random_weights.py", "t5", recipe.t5, "--d-model", recipe.t5_width, "--layers", recipe.t5_layers,
        "--vocab-size", recipe.t5_vocab, "--corpus", recipe.data))
    stage("features", (recipe.cache / "index.jsonl").is_file(), python(
        "tools/extract_features.py", recipe.data, recipe.cache, "--config", recipe.config, "--base-size", 32,
        "--autoencoder", "pixel", "--batch-size", 256, "--no-progress", *sets(recipe.paths())))
    cfg = load_config(Config, recipe.config, recipe.paths() + recipe.overrides)
    run_dir, done = finished_run(recipe, cfg.train.steps)
    train_cmd = (python("train/train.py", "--resume", run_dir) if run_dir is not None else
                 python("train/train.py", "--config", recipe.config, *sets(recipe.paths() + recipe.overrides)))
    stage("train", done, train_cmd)
    run_dir, _ = finished_run(recipe, cfg.train.steps)
    if dry_run:
        run_dir = recipe.runs / "NNNNN-shapes-teacher"
    stage("ship", False, fn=lambda: ship_teacher(recipe, run_dir))
    shipped = [f"sample.checkpoint={recipe.ship / 'teacher.safetensors'}", f"text_encoder.path={recipe.ship / 't5'}"]
    eval_out = recipe.work / "eval"
    stage("evaluate", False, python("tools/evaluate.py", "model", "--config", recipe.config, *sets(shipped),
                                    "--out", eval_out, "--no-progress"))
    if not dry_run:
        results = json.loads(sorted(eval_out.iterdir())[-1].joinpath("results.json").read_text())
        write_teacher_manifest(recipe, cfg, results, timings)
    log.info("stage seconds: %s", timings)


def ship_teacher(recipe: Recipe, run_dir: Path) -> None:
    """fp16 EMA weights (half the bytes; the evaluation runs on exactly these) and the T5 folder."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = run_dir / "ema.safetensors"
    with safe_open(str(source), framework="pt") as f:
        tensors = {k: f.get_tensor(k).half() for k in f.keys()}
        metadata = f.metadata()
    recipe.ship.mkdir(parents=True, exist_ok=True)
    save_file(tensors, recipe.ship / "teacher.safetensors", metadata=metadata)
    target = recipe.ship / "t5"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(recipe.t5, target)
    log.info("shipped %s (fp16) and %s", recipe.ship / "teacher.safetensors", target)


def write_teacher_manifest(recipe: Recipe, cfg, results: dict, timings: dict) -> None:
    from models.shipped import MANIFEST_NAME, read_manifest, write_manifest

    root = recipe.ship
    manifest = root / MANIFEST_NAME
    models = read_manifest(manifest).get("models", {}) if manifest.is_file() else {}
    command = "python train/shapes_recipe.py teacher" + "".join(f" --set {o}" for o in recipe.overrides)
    models["t5"] = {
        "files": sorted(p.relative_to(root).as_posix() for p in (root / "t5").rglob("*") if p.is_file()),
        "what": f"frozen random T5 encoder, {recipe.t5_layers} layers of width {recipe.t5_width}, sentencepiece tokenizer of "
                f"{recipe.t5_vocab} pieces trained on the training captions, known_words.txt",
        "command": command,
    }
    models["teacher"] = {
        "files": ["teacher.safetensors"],
        "what": "PixArt teacher (fp16 EMA weights), sampled with DPM-Solver++ 20 steps and CFG",
        "command": command,
        "config": f"configs/{recipe.config}.yaml",
        "data": {"images": recipe.num_images, "seed": recipe.data_seed, "object_weights": recipe.object_weights,
                 "min_gap": recipe.min_gap, "cell_margin": recipe.cell_margin, "size": "32x32"},
        "training": {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
                     "stage_seconds": timings},
        "evaluation": {k: results[k] for k in ("sampler", "steps", "guidance", "groups", "frechet_distance",
                                               "real_images", "seconds_per_image") if k in results},
    }
    log.info("manifest %s", write_manifest(root, models))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["teacher"], help="which shipped model to make")
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
        teacher(recipe, args.dry_run)
    except subprocess.CalledProcessError as e:
        log.error("error: a stage failed (exit %d): %s; fix it and run the recipe again: finished stages are "
                  "skipped and training resumes", e.returncode, " ".join(map(str, e.cmd)))
        return 2
    log.info("recipe done in %.1f minutes", (time.perf_counter() - start) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
