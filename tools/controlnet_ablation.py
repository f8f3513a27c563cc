"""The paper's ControlNet design ablation (its figure 5) as numbers, on the synthetic shapes set with the shipped
teacher: ControlNet-Transformer vs ControlNet-UNet, N copied blocks, edge agreement / caption accuracy / Frechet
distance against training steps, and the "sudden convergence" step.

    python tools/extract_features.py work/shapes/data work/shapes/cache-edge --config shapes_teacher --control edge
    python tools/controlnet_ablation.py                                   # every variant, about 1 hour on 2 cores
    python tools/controlnet_ablation.py --variants transformer:3 unet:3 --steps 100 200 --images 100

Each variant trains with train/train_controlnet.py --config controlnet_shapes (the branch only; the base is the
frozen shipped teacher) and stops at every step of --steps (resuming exactly), where the branch is evaluated by
tools/evaluate.py model --control on held-out scenes steered by their own edge maps. Step 0 is the base model
itself (a fresh branch changes nothing). Finished segments and evaluations are skipped, so an interrupted run
continues. Writes WORK/ablation.md (table), WORK/ablation.json, WORK/follows_map.png and WORK/edge_f1.png (curves).

Variants trained in separate folders (side by side, or on another machine) are put in one table and one plot with

    python tools/controlnet_ablation.py --work work/controlnet-all --merge work/cn-transformer1 work/cn-unet3 ...
"""

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("controlnet_ablation")


def python(*args) -> list[str]:
    return [sys.executable, *[str(a) for a in args]]


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def run(cmd: list[str], log_file: Path) -> None:
    log.info("$ %s", " ".join(str(c) for c in cmd))
    with open(log_file, "a") as out:
        code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"error: a stage failed (exit {code}), see {log_file}")


def current_step(run_dir: Path | None) -> int:
    pointer = run_dir / "checkpoints" / "latest.txt" if run_dir else None
    return int(pointer.read_text().strip()[len("step_"):-len(".pt")]) if pointer and pointer.is_file() else 0


def fresh_branch(path: Path, design: str, n: int, base: str) -> None:
    """The step-0 branch (zero projections: the base model exactly)."""
    from models.checkpoint import load_checkpoint
    from models.controlnet import ControlConfig, build_branch, save_branch
    from models.shipped import content_hash

    model, _, _ = load_checkpoint(base)
    save_branch(build_branch(model.float(), ControlConfig(design=design, num_blocks=n)), model, path,
                content_hash(base))


def evaluate(work: Path, name: str, branch: Path, args, extra: tuple[str, ...] = ()) -> dict:
    """tools/evaluate.py model --control with `branch` on the conflict set (and the agreeing captions' scenes);
    the results.json of WORK/eval/NAME, reused when it exists. `extra`: more config overrides."""
    out = work / "eval" / name
    if not (out / "results.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        tmp = work / "eval" / f".{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        run(python("tools/evaluate.py", "model", "--config", args.config, "--control", "--control-sets", "conflict",
                   "--out", tmp, "--no-progress",
                   *sets([f"control.checkpoint={branch}", f"evaluation.num_images={args.images}", *args.common,
                          *extra])),
            work / "log.txt")
        next(tmp.iterdir()).rename(out)
        shutil.rmtree(tmp)
    return json.loads((out / "results.json").read_text())


def row(design: str, n: int, step: int, r: dict) -> dict:
    single, multi = r["groups"]["single"], r["groups"].get("multi", {})
    conflict = r["control_sets"]["conflict"]
    return {"design": design, "N": n, "step": step, "follows_map": conflict["follows_map"],
            "map_position": conflict["map_position"], "map_kind": conflict["map_kind"],
            "follows_caption": conflict["follows_caption"], "caption_color": conflict["caption_color"],
            "conflict_edge_f1": conflict["edge_f1"], "edge_f1": r["edge_f1"], "single_kind": single["kind"],
            "single_all": single["all"], "multi_all": multi.get("all", float("nan")), "fd": r["frechet_distance"],
            "s_per_image": r["seconds_per_image"]}


def convergence_step(curve: list[dict], baseline: float, key: str = "follows_map") -> int | None:
    """The first evaluated step whose `key` (by default the conflict set's follows-the-map share, which following
    the caption cannot raise) is at least half way from the base model's to the final value."""
    final = curve[-1][key]
    half = baseline + 0.5 * (final - baseline)
    if final <= baseline:
        return None
    return next((r["step"] for r in curve if r["step"] > 0 and r[key] >= half), None)


def latest_run(work: Path, name: str) -> Path | None:
    """The newest training run of variant NAME in WORK (None before its first segment)."""
    found = sorted((work / "runs").glob(f"*-cn-{name}")) if (work / "runs").is_dir() else []
    return found[-1] if found else None


def check_steps(work: Path, variants: list[str], steps: list[int]) -> None:
    """Refuse, before anything loads, a step below what a variant's run has already trained without its branch:
    training only goes forward, so that branch can no longer be made in WORK."""
    for variant in variants:
        name = variant.replace(":", "")
        done = current_step(latest_run(work, name))
        missing = [s for s in steps if s < done and not (work / "branches" / f"{name}-{s}.safetensors").is_file()]
        if missing:
            raise SystemExit(f"error: {variant} in {work} is trained to step {done}, past the requested step(s) "
                             f"{missing}, whose branch was never kept; evaluate steps in a new --work folder, or "
                             f"drop {missing} from --steps")


def merge(folders: list[Path]) -> tuple[list[dict], dict[str, list[dict]]]:
    """The rows of several WORK/ablation.json, as one list and as curves by variant (a variant in two folders is
    an error: which one counts would be a guess)."""
    curves, origin = {}, {}
    for folder in dict.fromkeys(f.resolve() for f in folders):  # a folder named twice counts once
        path = folder / "ablation.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist: run tools/controlnet_ablation.py --work {folder} first")
        for r in json.loads(path.read_text())["rows"]:
            name = f"{r['design']}{r['N']}"
            if origin.setdefault(name, folder) != folder:
                raise SystemExit(f"error: variant {name} is in both {origin[name]} and {folder}: merge one of them")
            curves.setdefault(name, []).append(r)
    for curve in curves.values():
        curve.sort(key=lambda r: r["step"])
    return [r for curve in curves.values() for r in curve], curves


def report(work: Path, rows: list[dict], curves: dict[str, list[dict]]) -> None:
    """WORK/ablation.json, ablation.md (every row, then one line per variant) and the two PNG curves."""
    work.mkdir(parents=True, exist_ok=True)
    summary = {name: {"final_step": c[-1]["step"], "final_follows_map": c[-1]["follows_map"],
                      "final_edge_f1": c[-1]["edge_f1"],
                      "convergence_step": convergence_step(c, c[0]["follows_map"])}
               for name, c in curves.items()}
    (work / "ablation.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    lines = ["| design | N | step | conflict: follows map | map place | map kind | follows caption | caption colour "
             "| agree: edge F1 | single: kind | single: all | FD | s/image |", "|" + "---|" * 13]
    lines += [f"| {r['design']} | {r['N']} | {r['step']} | {r['follows_map']:.1f} | {r['map_position']:.1f} | "
              f"{r['map_kind']:.1f} | {r['follows_caption']:.1f} | {r['caption_color']:.1f} | {r['edge_f1']:.1f} | "
              f"{r['single_kind']:.1f} | {r['single_all']:.1f} | {r['fd']:.3f} | {r['s_per_image']:.3f} |"
              for r in rows]
    lines += ["", "| variant | last step | conflict: follows map | agree: edge F1 | sudden convergence (first step "
              "half way from the base's follows-map share to the final one) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['final_step']} | {v['final_follows_map']:.1f} | {v['final_edge_f1']:.1f} | "
              f"{v['convergence_step']} |" for k, v in summary.items()]
    (work / "ablation.md").write_text("\n".join(lines) + "\n")
    from evaluation.plot import line_plot

    line_plot({k: [(r["step"], r["follows_map"]) for r in c] for k, c in curves.items()}, work / "follows_map.png",
              "ControlNet on the shapes teacher: conflict set, follows the map", "training step", "follows map (%)")
    line_plot({k: [(r["step"], r["edge_f1"]) for r in c] for k, c in curves.items()}, work / "edge_f1.png",
              "ControlNet on the shapes teacher: edge F1 (agreeing captions)", "training step", "edge F1 (%)")
    log.info("wrote %s, %s, %s", work / "ablation.md", work / "follows_map.png", work / "edge_f1.png")
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "controlnet")
    parser.add_argument("--config", default="controlnet_shapes")
    parser.add_argument("--variants", nargs="+", default=["transformer:1", "transformer:2", "transformer:3",
                                                           "transformer:6", "unet:3", "unet:6"], help="DESIGN:N")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=200, help="held-out scenes per evaluation")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="WORK",
                        help="trains and evaluates nothing: puts these finished ablation folders in one table and "
                             "plot in --work")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.merge:
        report(args.work.resolve(), *merge(args.merge))
        return 0
    from configs import Config, load_config

    work = args.work.resolve()
    check_steps(work, args.variants, args.steps)
    (work / "branches").mkdir(parents=True, exist_ok=True)
    base = load_config(Config, args.config, args.overrides).control.base
    args.common = [f"text_encoder.path={ROOT / 'weights/shapes/t5'}", *args.overrides]
    rows, curves = [], {}
    for variant in args.variants:
        design, n = variant.split(":")
        n, name = int(n), f"{design}{n}"
        zero = work / "branches" / f"{name}-0.safetensors"
        if not zero.is_file():
            fresh_branch(zero, design, n, base)
        curve = [row(design, n, 0, evaluate(work, f"{name}-0", zero, args))]
        for step in sorted(args.steps):
            branch = work / "branches" / f"{name}-{step}.safetensors"
            if not branch.is_file():
                run_dir = latest_run(work, name)
                train = sets([f"train.steps={step}"])
                if run_dir is None:
                    cmd = python("train/train_controlnet.py", "--config", args.config, *sets([
                        f"train.runs_dir={work / 'runs'}", f"train.name=cn-{name}", f"control.design={design}",
                        f"control.num_blocks={n}", f"train.batch_size={args.batch_size}", "train.sample_every=0",
                        f"train.checkpoint_every={min(args.steps)}", *args.common]), *train)
                elif current_step(run_dir) < step:
                    cmd = python("train/train_controlnet.py", "--resume", run_dir, *train)
                else:
                    cmd = None
                if cmd:
                    run(cmd, work / "log.txt")
                run_dir = latest_run(work, name)
                shutil.copy(run_dir / "weights.safetensors", branch)
            curve.append(row(design, n, step, evaluate(work, f"{name}-{step}", branch, args)))
        curves[name] = curve
        rows += curve
    report(work, rows, curves)
    return 0


if __name__ == "__main__":
    sys.exit(main())
