"""Quality along training: every kept checkpoint of a run, exported and evaluated on the shapes held-out scenes.

    python tools/training_curve.py RUN_DIR --config lcm_shapes --split validation
    python tools/training_curve.py work/shapes/runs/00003-dmd-shapes --config dmd_shapes --steps 1 2

For each checkpoints/step_*.pt of the run (keep them with --set train.keep_checkpoints=100 when training), the
exported network's weights (EMA if the run kept one; --weights model for the raw ones) are written to
RUN/curve/step_N.WEIGHTS.safetensors and evaluated with `tools/evaluate.py model --config CONFIG`, sampling as the
config says (--steps: once per number of sampler steps). --split validation draws the scenes from the validation seed
(evaluation.validation_seed), which choosing a recipe may look at; the test split (the default) is for reporting.

Writes RUN/curve/curve.json, curve.md (one row per checkpoint: single-object attributes, mean, multi-object ones,
FD) and curve.png (accuracy per attribute against the step; FD x 100 on the same axis). Evaluations under other
settings (`--set sample.guidance=5`) go to their own folder, RUN/curve-sample.guidance=5/; what a folder's record
already holds for a step, split, step count and weights is not evaluated again.
"""

import argparse
import json
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger("training_curve")
ATTRIBUTES = ("kind", "color", "size", "position", "count")


def single_scores(results: dict) -> dict[str, float]:
    """The single-object accuracies, their mean, the multi-object count and the FD of one results.json."""
    groups = results["groups"]
    single = groups["single"]
    row = {a: single[a] for a in ATTRIBUTES if a in single}
    row["mean"] = sum(row.values()) / len(row)
    row["all"] = single.get("all")
    row["multi_count"] = groups.get("multi", {}).get("count")
    row["fd"] = results.get("frechet_distance")
    return row


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = sorted((int(p.stem.split("_")[1]), p) for p in (run / "checkpoints").glob("step_*.pt"))
    if not found:
        raise SystemExit(f"error: {run}/checkpoints holds no step_*.pt: train with --set train.keep_checkpoints=100 "
                         f"(and checkpoint_every at the curve's spacing) to keep them")
    return found


def export(ckpt: Path, out: Path, weights: str) -> Path:
    from engine.state import read_training_state
    from models.checkpoint import save_checkpoint

    if not out.is_file():
        state = read_training_state(ckpt, weights)
        save_checkpoint(state.state_dict, state.config, out, "safetensors", metadata=state.metadata)
    return out


def curve_folder(run: Path, overrides: list[str]) -> Path:
    """Where the curve of an evaluation config lives: RUN/curve, or RUN/curve-KEY=VALUE_... for extra --set
    overrides (the record skips what it has already measured, so one folder must never mix two configs)."""
    tag = re.sub(r"[^A-Za-z0-9._=+-]+", "_", "_".join(overrides))[:120]
    return run / (f"curve-{tag}" if tag else "curve")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with checkpoints/step_*.pt")
    parser.add_argument("--config", required=True, help="the sampling/evaluation config (e.g. lcm_shapes)")
    parser.add_argument("--split", choices=["validation", "test"], default="test")
    parser.add_argument("--steps", type=int, nargs="+", help="sampler steps to evaluate (default: the config's)")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema")
    parser.add_argument("--every", type=int, default=1, help="evaluate every N-th kept checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides of the evaluation config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    from evaluation.plot import line_plot
    from tools.evaluate import main as evaluate

    exported = args.run / "curve"  # the checkpoints as weight files, shared by every evaluation of the run
    folder = curve_folder(args.run, args.overrides)
    exported.mkdir(exist_ok=True)
    folder.mkdir(exist_ok=True)
    record_path = folder / "curve.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    from configs import Config, load_config

    ec = load_config(Config, args.config, args.overrides).evaluation
    split = [f"evaluation.seed={ec.validation_seed}"] if args.split == "validation" else []
    for step, ckpt in checkpoints(args.run)[:: args.every]:
        weights = export(ckpt, exported / f"step_{step:08d}.{args.weights}.safetensors", args.weights)
        for steps in args.steps or [None]:
            key = f"{args.split}/{step}/{steps or 'config'}/{args.weights}"
            if key in record:
                continue
            out = folder / "eval" / f"step_{step:08d}_{steps or 'config'}_{args.weights}"
            overrides = [f"sample.checkpoint={weights}", *split, *args.overrides,
                         *([f"sample.steps={steps}"] if steps else [])]
            code = evaluate(["model", "--config", args.config, "--out", str(out), "--no-progress",
                             *[a for o in overrides for a in ("--set", o)]])
            if code:
                return code
            results = json.loads(sorted(out.glob("*/results.json"))[-1].read_text())
            record[key] = {"step": step, "sampler_steps": steps, "weights": args.weights, **single_scores(results)}
            record_path.write_text(json.dumps(record, indent=1) + "\n")
    rows = sorted((r for k, r in record.items()
                   if k.startswith(args.split + "/") and r.get("weights") == args.weights),
                  key=lambda r: (r["sampler_steps"] or 0, r["step"]))
    lines = [f"| step | sampler steps | {' | '.join(ATTRIBUTES)} | mean | all | multi count | FD |",
             "|" + "---|" * (len(ATTRIBUTES) + 6)]
    for r in rows:
        cells = [f"{r.get(a, float('nan')):.1f}" for a in ATTRIBUTES]
        lines.append(f"| {r['step']} | {r['sampler_steps'] or 'config'} | {' | '.join(cells)} | {r['mean']:.1f} | "
                     f"{r['all'] or 0:.1f} | {r['multi_count'] or 0:.1f} | {r['fd'] or 0:.3f} |")
    (folder / "curve.md").write_text("\n".join(lines) + "\n")
    for steps in sorted({r["sampler_steps"] or 0 for r in rows}):
        subset = [r for r in rows if (r["sampler_steps"] or 0) == steps]
        series = {a: [(r["step"], r[a]) for r in subset if a in r] for a in (*ATTRIBUTES, "mean")}
        series["FD x 100"] = [(r["step"], 100 * r["fd"]) for r in subset if r["fd"] is not None]
        name = f"curve{'_' + str(steps) if steps else ''}.png"
        line_plot(series, folder / name, f"{args.run.name}: {args.split} split, {steps or 'config'} sampler steps",
                  "training step", "accuracy (%)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
