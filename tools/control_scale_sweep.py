"""How strongly should the control steer? One shipped branch evaluated at a range of conditioning scales.

    python tools/control_scale_sweep.py                                    # the shipped branch on the teacher
    python tools/control_scale_sweep.py --config lcm_shapes --set control.check_base=false   # on the student
    python tools/control_scale_sweep.py --scales 0 0.5 1 --images 50

At every scale (control.scale: each injected residual is multiplied by it; 0 is the base model exactly) the branch
steers held-out scenes by tools/evaluate.py model --control: the conflict set (the caption names another kind at
another place than the edge map draws) gives "follows the map" against "follows the caption" and the caption's
colour, the agreeing captions give edge F1 and FD. Writes WORK/sweep.md (table), WORK/sweep.json and WORK/sweep.png
(the shares against the scale, FD x 100 on the same axis). Finished evaluations are reused.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from tools.controlnet_ablation import ROOT, evaluate

log = logging.getLogger("control_scale_sweep")
COLUMNS = ("follows_map", "map_position", "map_kind", "follows_caption", "caption_color")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "control-scale")
    parser.add_argument("--config", default="controlnet_shapes", help="the model and sampler to steer")
    parser.add_argument("--branch", type=Path, default=ROOT / "weights" / "shapes" / "controlnet.safetensors")
    parser.add_argument("--scales", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    parser.add_argument("--images", type=int, default=200, help="held-out scenes per set")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if not args.branch.is_file():
        raise SystemExit(f"error: no ControlNet branch at {args.branch}: train one (python train/shapes_recipe.py "
                         f"controlnet) or pass --branch FILE")
    bad = [s for s in args.scales if not 0 <= s <= 2]
    if bad:
        raise SystemExit(f"error: scales must lie in 0..2 (control.scale), got {bad}")
    work = args.work.resolve() / args.config
    work.mkdir(parents=True, exist_ok=True)
    args.common = [f"text_encoder.path={ROOT / 'weights/shapes/t5'}", *args.overrides]
    rows = []
    for scale in sorted(args.scales):
        r = evaluate(work, f"scale-{scale:g}", args.branch.resolve(), args, (f"control.scale={scale}",))
        conflict = r["control_sets"]["conflict"]
        rows.append({"scale": scale, **{c: conflict[c] for c in COLUMNS}, "edge_f1": r["edge_f1"],
                     "fd": r["frechet_distance"]})
    (work / "sweep.json").write_text(json.dumps({"branch": str(args.branch), "config": args.config, "rows": rows},
                                                indent=1) + "\n")
    lines = [f"Control-scale sweep of {args.branch.name} steering `{args.config}`, {args.images} held-out scenes "
             f"per set", "", "| scale | conflict: follows map | map place | map kind | follows caption | "
             "caption colour | agree: edge F1 | FD |", "|" + "---|" * 8]
    lines += [f"| {r['scale']:g} | " + " | ".join(f"{r[c]:.1f}" for c in (*COLUMNS, "edge_f1")) + f" | {r['fd']:.3f} |"
              for r in rows]
    (work / "sweep.md").write_text("\n".join(lines) + "\n")
    from evaluation.plot import line_plot

    series = {name: [(r["scale"], r[key]) for r in rows] for name, key in (
        ("follows map", "follows_map"), ("follows caption", "follows_caption"), ("caption colour", "caption_color"),
        ("edge F1", "edge_f1"))}
    series["FD x 100"] = [(r["scale"], 100 * r["fd"]) for r in rows]
    line_plot(series, work / "sweep.png", f"{args.branch.name} on {args.config}: conflict set against control scale",
              "control scale", "%")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
