"""Two evaluations of the same scenes compared image by image: B's accuracy minus A's per attribute, with its
paired standard error, a 95% interval and McNemar's exact p-value (evaluation/paired.py).

    python tools/evaluate.py model --config dmd_shapes_4step --out work/eval/a
    python tools/evaluate.py model --config dmd_shapes_4step --set sample.checkpoint=OTHER --out work/eval/b
    python tools/compare_evals.py work/eval/a/00000 work/eval/b/00000 --group single

Both must have read the same scenes (the same evaluation.seed, num_images and split): every caption is checked.
Only the scenes one model gets right and the other wrong carry the difference, so on the same 311 single-object
scenes a 2-point difference in kind can be clear or noise depending on how many scenes the two disagree on; two
readings on different scenes each carry a binomial standard error (results.md lists them) and differ by noise of
both. An evaluation made before scores.jsonl was written is scored again from its images with `python
tools/evaluate.py folder RUN/images`. Prints a Markdown table; --json writes the numbers.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from common.errors import UserError
from evaluation.paired import ATTRIBUTE_COLUMNS, IMAGE_COLUMNS, check_same_scenes, compare, read_scores

log = logging.getLogger("compare_evals")
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def table(result: dict, names: tuple[str, str]) -> str:
    lines = [f"| measure | A: {names[0]} | B: {names[1]} | B - A | paired s.e. | 95% interval | only A right | "
             "only B right | McNemar p |", "|---|---|---|---|---|---|---|---|---|"]
    for measure in (*ATTRIBUTE_COLUMNS, *IMAGE_COLUMNS):
        r = result[measure]
        lo, hi = r["difference"] - Z95 * r["stderr"], r["difference"] + Z95 * r["stderr"]
        lines.append(f"| {measure} (n = {r['n']}) | {r['a']:.1f} | {r['b']:.1f} | {r['difference']:+.1f} | "
                     f"{r['stderr']:.1f} | [{lo:+.1f}, {hi:+.1f}] | {r['only_a']} | {r['only_b']} | "
                     f"{r['p_value']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="evaluation folder A (holding scores.jsonl)")
    p.add_argument("b", type=Path, help="evaluation folder B, of the same scenes")
    p.add_argument("--group", choices=["single", "multi", "all"], default="single",
                   help="which captions: single-object (default), multi-object or all")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        a, b = read_scores(args.a), read_scores(args.b)
        names = (str(args.a), str(args.b))
        check_same_scenes(a, b, names)
        result = compare(a, b, args.group)
        if result["kind"]["n"] == 0:
            raise UserError(f"the evaluations hold no {args.group}-object captions: choose another --group")
    except UserError as e:
        log.error("error: %s", e)
        return 2
    print(f"{args.group}-object captions, {result['count']['n']} images; B - A in points\n")
    print(table(result, names))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"a": names[0], "b": names[1], "group": args.group, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
