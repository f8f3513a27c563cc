"""The regression loss of generator checkpoints on a pairs file, per start timestep: how well each checkpoint draws
the teacher's image from what a step of it sees. On the pairs a run trained on and on pairs it never saw (made with
another --seed), it separates fitting from memorising.

    python tools/pairs_loss.py work/shapes/pairs_b.safetensors weights/shapes/student.safetensors \\
        RUN/curve/step_00001000.ema.safetensors RUN/curve/step_00006000.ema.safetensors --config dmd_shapes_4step

For each checkpoint and each start timestep t of the file (T - 1 for rows from pure noise; the --start-timesteps
rows at theirs), the first --rows rows at t are fed to the checkpoint at t with their caption (no guidance), and the
mean squared distance of its image (the x0 estimate, in latent space) to the teacher's is averaged: the term that
`dmd.regression_weight` trains (dmd.regression_steps: own). With --kinds the same images are also decoded and read
by the shapes reader (evaluation/shapes.py): the share of rows whose largest shape the checkpoint draws as the same
kind as the teacher's image holds (rows where the teacher's image holds no shape the reader accepts are left out), a
measure in the evaluator's own terms of how much of the teacher's kind each step keeps, on pairs trained on and not.
A table (markdown) goes to stdout and, with --out, to a file.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from common.errors import UserError
from common.files import print_report

log = logging.getLogger("pairs_loss")

PIXELS_PER_LATENT = {"pixel": 1, "sd-vae": 8}  # image pixels per latent pixel, for micro-conditioned models


def largest_kind(images) -> list[str | None]:
    """The kind of the largest shape the reader accepts in each image (N, 3, H, W) in [-1, 1]; None: no shape."""
    from evaluation.shapes import read_shapes

    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [next((d.kind for d in read_shapes(im)), None) for im in pixels]


def kind_agreement(ours: list[str | None], teacher: list[str | None]) -> float:
    """Percent of the rows with a teacher shape where ours reads the same kind."""
    kept = [(a, b) for a, b in zip(ours, teacher) if b is not None]
    return 100.0 * sum(a == b for a, b in kept) / max(len(kept), 1)


def pairs_loss(pairs: dict, checkpoints: list[str], cfg, rows: int, batch_size: int = 100,
               kinds: bool = False) -> tuple[dict[str, dict], dict[str, dict]]:
    """({checkpoint: {start timestep: mean regression loss over its first `rows` rows}}, and with `kinds` the same
    of the kind agreement with the teacher's image in percent, else {})."""
    from data.features import batch_conditions
    from diffusion.dmd import DistributionMatching
    from models.autoencoder import load_autoencoder
    from models.checkpoint import load_checkpoint

    schedule = cfg.diffusion.build()
    objective = DistributionMatching(schedule, cfg.diffusion.prediction)
    num_train = schedule.num_steps
    timestep = pairs.get("timestep", torch.full((len(pairs["index"]),), num_train - 1))
    starts = sorted(set(timestep.tolist()), reverse=True)
    h, w = pairs["image"].shape[-2:]
    down = PIXELS_PER_LATENT[cfg.autoencoder.kind]
    vae = load_autoencoder(cfg.autoencoder) if kinds else None
    teacher_kinds = {}
    if kinds:
        for t in starts:
            chosen = (timestep == t).nonzero().flatten()[:rows]
            teacher_kinds[t] = largest_kind(vae.decode(pairs["image"][chosen].float()))
    table, agreement = {}, {}
    for path in checkpoints:
        net, _, _ = load_checkpoint(path, cfg.model, device=torch.device("cpu"))  # a foreign file is named here
        net = net.float().eval()
        table[path] = {}
        if kinds:
            agreement[path] = {}
        for t in starts:
            chosen = (timestep == t).nonzero().flatten()[:rows]
            losses, read = [], []
            for s in range(0, len(chosen), batch_size):
                i = chosen[s:s + batch_size]
                batch = {"y": pairs["y"][i].float(), "mask": pairs["mask"][i].long(),
                         "resolution": torch.tensor([[h * down, w * down]], dtype=torch.float32).expand(len(i), 2),
                         "aspect_ratio": torch.tensor([[h / w]], dtype=torch.float32).expand(len(i), 1)}
                cond = batch_conditions(net, batch)
                with torch.no_grad():
                    losses.append(objective.regression_loss_at(net, pairs["noise"][i], timestep[i],
                                                               pairs["image"][i], cond))
                    if kinds:
                        read += largest_kind(vae.decode(objective.x0(net, pairs["noise"][i], timestep[i], cond)))
            table[path][t] = torch.cat(losses).mean().item()
            if kinds:
                agreement[path][t] = kind_agreement(read, teacher_kinds[t])
        log.info("%s: %s", path, ", ".join(f"t={t}: {v:.4f}" for t, v in table[path].items()))
    return table, agreement


def to_markdown(table: dict[str, dict], pairs_path: Path, rows: int, agreement: dict[str, dict] | None = None) -> str:
    starts = list(next(iter(table.values())))
    lines = [f"Regression loss (mean squared, latent space) on {pairs_path}, the first {rows} rows per start "
             f"timestep", "", "| checkpoint | " + " | ".join(f"t = {t}" for t in starts) + " |",
             "|---|" + "---|" * len(starts)]
    lines += [f"| {path} | " + " | ".join(f"{losses[t]:.4f}" for t in starts) + " |" for path, losses in table.items()]
    if agreement:
        lines += ["", "Kind agreement with the teacher's image (%, the shapes reader; rows with a teacher shape)", "",
                  "| checkpoint | " + " | ".join(f"t = {t}" for t in starts) + " |", "|---|" + "---|" * len(starts)]
        lines += [f"| {path} | " + " | ".join(f"{kept[t]:.1f}" for t in starts) + " |"
                  for path, kept in agreement.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from configs import Config, add_config_arguments, load_config
    from data.pairs import load_pairs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", type=Path, help="a pairs file of tools/make_ode_pairs.py (or tools/join_pairs.py)")
    p.add_argument("checkpoints", nargs="+", help="generator checkpoints (any format the project loads)")
    add_config_arguments(p, default="dmd_shapes_4step")
    p.add_argument("--rows", type=int, default=500, help="rows per start timestep (the first ones)")
    p.add_argument("--kinds", action="store_true", help="also the reader's kind agreement with the teacher's images")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (.md)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        if args.rows < 1:
            raise UserError(f"--rows must be >= 1, got {args.rows}")
        missing = [c for c in args.checkpoints if not Path(c).exists()]
        if missing:
            raise UserError(f"no such checkpoint: {', '.join(missing)}")
        cfg = load_config(Config, args.config, args.overrides)
        pairs = load_pairs(args.pairs)  # a missing, foreign or damaged file is named here
        channels = pairs["noise"].shape[1]
        if channels != cfg.model.in_channels:
            raise UserError(f"{args.pairs} holds {channels}-channel latents, the model of --config {args.config} "
                            f"takes {cfg.model.in_channels}: give the config of the pairs' teacher")
        table, agreement = pairs_loss(pairs, args.checkpoints, cfg, args.rows, kinds=args.kinds)
        text = to_markdown(table, args.pairs, args.rows, agreement)
    except UserError as e:
        log.error("error: %s", e)
        return 2
    print_report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
