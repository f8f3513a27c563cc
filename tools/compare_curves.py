"""Several training curves side by side: one PNG per measure (a line per run) and one markdown table.

    python tools/compare_curves.py docs/lcd_target_decay \\
        "mu 0.95=work/shapes/runs/00001-fewstep-lcd1600" "mu 0.995=work/shapes/runs/00008-lcd-mu995" \\
        --split validation --steps 4 --measures kind fd

Each run must have been evaluated by tools/training_curve.py (RUN/curve/curve.json); nothing is evaluated here.
Writes OUT_kind.png, OUT_fd.png, ... (FD is plotted as is, accuracies in %) and OUT.md (a row per run and step).
"""

import argparse
import json
import sys
from pathlib import Path

MEASURES = ("kind", "color", "size", "position", "count", "mean", "all", "multi_count", "fd")


def load_curve(run: Path, split: str, steps: int | None) -> list[dict]:
    """The rows of RUN/curve/curve.json for one split and sampler step count, ordered by training step."""
    path = run / "curve" / "curve.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: run `python tools/training_curve.py {run} --config ... "
                         f"--split {split}` first")
    rows = [r for key, r in json.loads(path.read_text()).items()
            if key.startswith(split + "/") and r["sampler_steps"] == steps]
    if not rows:
        more = f" --steps {steps}" if steps else ""
        raise SystemExit(f"error: {path} has no {split} rows at {steps or 'the config'} sampler steps: evaluate "
                         f"them with tools/training_curve.py {run} --split {split}{more}")
    return sorted(rows, key=lambda r: r["step"])


def parse_run(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=RUN_DIR, got {text!r}")
    return label, Path(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output prefix: OUT_<measure>.png and OUT.md")
    parser.add_argument("runs", type=parse_run, nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--split", choices=["validation", "test"], default="validation")
    parser.add_argument("--steps", type=int, help="sampler steps of the rows (default: the config's)")
    parser.add_argument("--measures", nargs="+", choices=MEASURES, default=["kind", "fd"])
    args = parser.parse_args(argv)
    from evaluation.plot import line_plot

    curves = {label: load_curve(run, args.split, args.steps) for label, run in args.runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for measure in args.measures:
        series = {label: [(r["step"], r[measure]) for r in rows if r.get(measure) is not None]
                  for label, rows in curves.items()}
        unit = "Frechet distance (evaluator features)" if measure == "fd" else f"{measure} (%)"
        line_plot(series, f"{args.out}_{measure}.png", f"{measure}, {args.split} split, "
                  f"{args.steps or 'config'} sampler steps", "training step", unit)
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
