"""Several training curves side by side: one PNG per measure (a line per run) and one markdown table.

    python tools/compare_curves.py docs/lcd_target_decay \\
        "mu 0.95=work/shapes/runs/00001-fewstep-lcd1600" "mu 0.995=work/shapes/runs/00008-lcd-mu995" \\
        --split validation --steps 4 --weights model --measures kind fd

Each run must have been evaluated by tools/training_curve.py with the same --weights and --set overrides (its
RUN/curve/curve.json, or RUN/curve-KEY=VALUE/curve.json for extra overrides); nothing is evaluated here.
Writes OUT_kind.png, OUT_fd.png, ... (FD is plotted as is, accuracies in %) and OUT.md (a row per run and step).
With --against fd, each other measure is drawn against FD instead of the training step (OUT_kind_vs_fd.png: a trade-off
plane, each run's checkpoints joined in training order).
"""

import argparse
import json
import sys
from pathlib import Path

MEASURES = ("kind", "color", "size", "position", "count", "mean", "all", "multi_count", "fd")


def load_curve(run: Path, split: str, steps: int | None, weights: str, overrides: list[str]) -> list[dict]:
    """The rows of a run's curve record (the folder of `overrides`) for one split, sampler step count and weights
    (ema | model), ordered by training step."""
    from tools.training_curve import curve_folder

    path = curve_folder(run, overrides) / "curve.json"
    command = (f"python tools/training_curve.py {run} --config CONFIG --split {split} --weights {weights}"
               + (f" --steps {steps}" if steps else "") + "".join(f" --set {o}" for o in overrides))
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: evaluate the run first: {command}")
    rows = [r for key, r in json.loads(path.read_text()).items()
            if key.startswith(split + "/") and r["sampler_steps"] == steps and r.get("weights") == weights]
    if not rows:
        raise SystemExit(f"error: {path} has no {split} rows of the {weights} weights at {steps or 'the config'} "
                         f"sampler steps (records older than the weights field count as none): {command}")
    return sorted(rows, key=lambda r: r["step"])


def parse_run(text: str) -> tuple[str, Path]:
    """LABEL=RUN_DIR; a label may hold '=' itself ("t>=0.3T=runs/00013"): the split is at the first '=' after which
    an existing folder is named (else the first '=')."""
    cuts = [i for i, c in enumerate(text) if c == "="]
    cut = next((i for i in cuts if Path(text[i + 1:]).is_dir()), cuts[0] if cuts else -1)
    label, path = text[:cut], text[cut + 1:]
    if cut < 0 or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=RUN_DIR, got {text!r}")
    return label, Path(path)


def axis_label(measure: str) -> str:
    return "Frechet distance (evaluator features)" if measure == "fd" else f"{measure} (%)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output prefix: OUT_<measure>.png and OUT.md")
    parser.add_argument("runs", type=parse_run, nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--split", choices=["validation", "test"], default="validation")
    parser.add_argument("--steps", type=int, help="sampler steps of the rows (default: the config's)")
    parser.add_argument("--measures", nargs="+", choices=MEASURES, default=["kind", "fd"])
    parser.add_argument("--weights", choices=["ema", "model"], default="ema", help="as given to training_curve.py")
    parser.add_argument("--against", choices=MEASURES, help="the x axis: this measure instead of the training step")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="the extra evaluation overrides given to training_curve.py (they name its folder)")
    args = parser.parse_args(argv)
    from evaluation.plot import line_plot

    curves = {label: load_curve(run, args.split, args.steps, args.weights, args.overrides) for label, run in args.runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    x = args.against or "step"
    for measure in (m for m in args.measures if m != args.against):
        series = {label: [(r[x], r[measure]) for r in rows if r.get(x) is not None and r.get(measure) is not None]
                  for label, rows in curves.items()}
        name = f"{args.out}_{measure}" + (f"_vs_{args.against}" if args.against else "")
        line_plot(series, f"{name}.png", f"{measure}, {args.split} split, {args.steps or 'config'} sampler steps, "
                  f"{args.weights} weights" + (" (joined in training order)" if args.against else ""),
                  axis_label(args.against) if args.against else "training step", axis_label(measure),
                  by_x=not args.against, y_from_zero=not args.against)
    lines = [f"| run | step | {' | '.join(args.measures)} |", "|---|---|" + "---|" * len(args.measures)]
    for label, rows in curves.items():
        for r in rows:
            cells = [f"{r[m]:.3f}" if m == "fd" else f"{r[m]:.1f}" for m in args.measures]
            lines.append(f"| {label} | {r['step']} | {' | '.join(cells)} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
