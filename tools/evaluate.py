"""Measure generated images: caption accuracy and Frechet distance on the synthetic shapes set; FID; CLIP score.

    python tools/evaluate.py model --config shapes_teacher                      # held-out captions -> images -> score
    python tools/evaluate.py model --config shapes_teacher --set sample.steps=4 --set sample.guidance=1
    python tools/evaluate.py folder outputs/shapes/00003 --real data/shapes-eval  # score a folder of images
    python tools/evaluate.py probe --config shapes_teacher --swap kind           # where is the kind decided?
    python tools/evaluate.py agree outputs/eval/00001-shapes_teacher            # the two shapes readers side by side
    python tools/evaluate.py fid GEN_DIR REAL_DIR --weights pt_inception-2015-12-05-6726825d.pth
    python tools/evaluate.py clip GEN_DIR --clip weights/clip-vit-large-patch14

`model` draws the held-out scenes of the config's `evaluation:` section (their captions and real renders; a seed
no training set uses), generates one image per caption with the config's sampler, and scores them. `folder`
scores images whose captions come from metadata.jsonl, the PNG's "prompt" text field (sample/sample.py writes it)
or a .txt beside each image. Each writes results.json, results.md (a Markdown table) and worst.png (the images
furthest from their captions) into a numbered folder of --out.

The shapes reader is exact image analysis (evaluation/shapes.py), not a learned model; FID and CLIP score use
standard weights files the user provides (nothing is downloaded).
"""

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from common.errors import UserError

log = logging.getLogger("evaluate")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class EvalError(UserError):
    """A bad evaluation input; the message names it and the fix."""


# ----------------------------------------------------------------------------------------------------------
# Folders of images


def load_images(paths: list[Path], min_side: int | None = None, what: str = "images") -> tuple[list[np.ndarray], dict]:
    """RGB uint8 arrays of image files (evaluation/images.py), and what was found on the way: the sizes (a folder
    that mixes sizes is read image by image, each at its own size, and says so) and each conversion (alpha,
    16 bits), logged with the files it concerns. min_side: refuse smaller images (the shapes reader's minimum)."""
    from collections import Counter

    from evaluation.images import read_rgb

    loaded = [read_rgb(p, min_side) for p in paths]
    sizes = Counter(f"{im.pixels.shape[1]}x{im.pixels.shape[0]}" for im in loaded)
    notes: dict[str, list[str]] = {}
    for path, image in zip(paths, loaded):
        if image.note is not None:
            notes.setdefault(image.note, []).append(path.name)
    for note, names in notes.items():
        log.warning("%s: %d %s (%s%s)", note, len(names), what, ", ".join(names[:5]), ", ..." if len(names) > 5 else "")
    if len(sizes) > 1:
        log.warning("the %s mix sizes (%s): each is read at its own size", what,
                    ", ".join(f"{k}: {v}" for k, v in sizes.most_common()))
    return [im.pixels for im in loaded], {"sizes": dict(sizes), "conversions": {k: len(v) for k, v in notes.items()}}


def image_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise EvalError(f"{str(folder)!r}: no such folder")
    if not folder.is_dir():
        raise EvalError(f"{str(folder)!r} is a file, not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png"
                   and p.name != "worst.png")
    if not files:
        raise EvalError(f"{str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def captioned_images(folder: Path, partial: bool) -> tuple[list[Path], list[str]]:
    """(image paths, captions) of a folder: metadata.jsonl, else each PNG's "prompt" field, else NAME.txt.

    Images without a caption ("extra") and captions whose image is missing are errors, unless `partial`, which
    scores the images that have both and says how many were left out.
    """
    files = image_files(folder)
    captions: dict[str, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for n, line in enumerate(metadata.read_text().splitlines(), 1):
            if line.strip():
                try:
                    item = json.loads(line)
                    captions[item["image"]] = item["caption"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise EvalError(f"{metadata}:{n} is not a {{\"image\", \"caption\"}} JSON line ({e})") from e
    else:
        for path in files:
            text = None
            if path.suffix.lower() == ".png":
                try:
                    with Image.open(path) as image:
                        text = image.text.get("prompt") if hasattr(image, "text") else None
                except (OSError, UnidentifiedImageError, SyntaxError) as e:
                    raise EvalError(f"cannot read image {str(path)!r}: {e}") from e
            if text is None and path.with_suffix(".txt").is_file():
                text = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
            if text is not None:
                captions[path.name] = text
    names = {p.name for p in files}
    extra = sorted(names - set(captions))
    missing = sorted(set(captions) - names)
    if (extra or missing) and not partial:
        problems = []
        if missing:
            problems.append(f"{len(missing)} captioned images are missing ({', '.join(missing[:5])}"
                            f"{', ...' if len(missing) > 5 else ''})")
        if extra:
            problems.append(f"{len(extra)} images have no caption ({', '.join(extra[:5])}"
                            f"{', ...' if len(extra) > 5 else ''}; captions come from metadata.jsonl, the PNG "
                            f"'prompt' field or NAME.txt)")
        raise EvalError(f"{folder}: " + "; ".join(problems) + ". Fix the folder, or pass --partial to score only "
                        "the images that have captions")
    if extra or missing:
        log.warning("--partial: scoring %d images; left out %d without caption and %d missing", len(names) - len(extra),
                    len(extra), len(missing))
    kept = [p for p in files if p.name in captions]
    if not kept:
        raise EvalError(f"{folder}: no image has a caption")
    return kept, [captions[p.name] for p in kept]


# ----------------------------------------------------------------------------------------------------------
# Commands


def run_folder(args) -> dict:
    from evaluation.report import evaluate_images, write_report
    from evaluation.shapes import MIN_SIDE

    paths, captions = captioned_images(args.folder, args.partial)
    images, found = load_images(paths, MIN_SIDE)
    real = load_images(image_files(args.real), MIN_SIDE, "real images")[0] if args.real else None
    results, scores = evaluate_images(images, captions, real, progress=not args.no_progress)
    out = output_dir(args.out, "folder")
    return out, write_report(out, results, scores, images, captions, real, {"folder": str(args.folder),
                                                                              "images_found": found})


def run_model(args) -> dict:
    import torch

    from configs import Config, load_config
    from data.synthetic import caption, render, render_edges, scene_at
    from evaluation.report import evaluate_images, write_report
    from evaluation.shapes import MIN_SIDE
    from pipeline.generate import generate, plan, with_controls

    cfg = load_config(Config, args.config, args.overrides)
    ec, s = cfg.evaluation, cfg.sample
    if min(ec.width, ec.height) < MIN_SIDE:
        raise EvalError(f"evaluation.width/height {ec.width}x{ec.height}: the shapes reader needs images of at least "
                        f"{MIN_SIDE}x{MIN_SIDE} pixels")
    if ec.num_images < 2:
        raise EvalError(f"evaluation.num_images must be >= 2 (a Frechet distance needs a covariance), got "
                        f"{ec.num_images}")
    s.width, s.height, s.images_per_prompt = ec.width, ec.height, 1
    scenes = [scene_at(ec.seed, i, [(ec.width, ec.height)], ec.scene()) for i in range(ec.num_images)]
    captions = [caption(objects) for _, _, objects in scenes]
    real = [np.asarray(render(objects, w, h)) for w, h, objects in scenes]
    request = plan(cfg, captions)
    controls = None
    if args.control:  # each scene's own edge map, as the ControlNet was trained with
        controls = [np.asarray(render_edges(objects, w, h)) for w, h, objects in scenes]
        maps = torch.from_numpy(np.stack(controls)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W)
        request = with_controls(cfg, request, maps)
    out = output_dir(args.out, Path(args.config).stem)
    start = time.perf_counter()
    generated = generate(cfg, request, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    images = [img.mul(255).round().byte().permute(1, 2, 0).numpy() for img in generated.images]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, (image, text) in enumerate(zip(images, captions)):
        info = PngInfo()
        info.add_text("prompt", text)
        Image.fromarray(image).save(out / "images" / f"{i:05d}.png", pnginfo=info)
    results, scores = evaluate_images(images, captions, real, progress=not args.no_progress)
    t = generated.timings
    extra = {
        "config": args.config, "overrides": list(args.overrides), "checkpoint": s.checkpoint, "sampler": s.sampler,
        "steps": s.steps, "guidance": s.guidance, "seed": s.seed, "held_out_seed": ec.seed,
        "size": f"{ec.width}x{ec.height}", "device": s.device, "dtype": s.dtype, "threads": torch.get_num_threads(),
        "seconds_per_image": round((t.denoising + t.vae_decoding) / len(images), 5),
        "seconds_total": round(elapsed, 2),
    }
    if controls is not None:
        from evaluation.edges import edge_agreement

        extra.update({"control_checkpoint": cfg.control.checkpoint, "control_design": cfg.control.design,
                      "control_blocks": cfg.control.num_blocks, "control_scale": cfg.control.scale,
                      **{k: round(v, 2) for k, v in edge_agreement(images, controls).items()},
                      "real_edge_f1": round(edge_agreement(real, controls)["edge_f1"], 2)})
    record = write_report(out, results, scores, images, captions, real, extra)
    if controls is not None and args.control_sets:
        record["control_sets"] = control_sets(cfg, args, out)
        (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        with open(out / "results.md", "a") as md:
            md.write("\n" + control_table(record["control_sets"]))
    return out, record


CONTROL_COLUMNS = ("edge_f1", "follows_map", "map_position", "map_kind", "follows_caption", "caption_color",
                   "no_object")


def control_sets(cfg, args, out: Path) -> dict:
    """The control evaluation (evaluation/control.py) on each requested set of single-object scenes: the same
    number of scenes as the config's held-out set, generated with its sampling settings through the branch."""
    import torch

    from evaluation.control import control_items, score_control
    from evaluation.edges import edge_agreement
    from pipeline.generate import generate, plan, with_controls

    ec = cfg.evaluation
    found = {}
    for which in args.control_sets:
        items = control_items(ec.seed, ec.num_images, which, ec.width, ec.height, ec.scene())
        maps = torch.from_numpy(np.stack([it.edges for it in items])).permute(0, 3, 1, 2).float() / 127.5 - 1
        request = with_controls(cfg, plan(cfg, [it.caption for it in items]), maps)
        generated = generate(cfg, request, progress=not args.no_progress)
        images = [img.mul(255).round().byte().permute(1, 2, 0).numpy() for img in generated.images]
        row = {"scenes": len(items), "edge_f1": edge_agreement(images, [it.edges for it in items])["edge_f1"],
               **score_control(images, items)}
        found[which] = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        folder = out / f"control_{which}"
        folder.mkdir(exist_ok=True)
        tiles = []
        for i, (image, item) in enumerate(zip(images, items)):
            info = PngInfo()
            info.add_text("prompt", item.caption)
            Image.fromarray(image).save(folder / f"{i:05d}.png", pnginfo=info)
            if i < 16:
                tiles.append(np.concatenate([item.edges, image], axis=1))  # the map beside the image
        grid = np.concatenate([np.concatenate(tiles[r:r + 4], axis=1) for r in range(0, len(tiles) - 3, 4)], axis=0)
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(
            out / f"control_{which}.png")
        log.info("control set %s: %s", which, found[which])
    return found


def control_table(sets: dict) -> str:
    """Markdown: one row per control set."""
    lines = ["| control set | scenes | " + " | ".join(CONTROL_COLUMNS) + " |",
             "|---|---|" + "---|" * len(CONTROL_COLUMNS)]
    for which, row in sets.items():
        cells = " | ".join(f"{row[c]:.1f}" if c in row else "-" for c in CONTROL_COLUMNS)
        lines.append(f"| {which} | {row['scenes']} | {cells} |")
    return "\n".join(lines) + "\n"


def run_agree(args) -> dict:
    """Both shapes readers on a folder of captioned images (a `model` run's folder or its images/): per-attribute
    agreement, each reader's caption accuracy, and disagreements.png (evaluation/agreement.py)."""
    from evaluation.agreement import agreement, confidence_markdown, disagreement_grid, markdown, read_both
    from evaluation.classifier import load_classifier
    from evaluation.shapes import MIN_SIDE

    folder = args.folder / "images" if (args.folder / "images").is_dir() else args.folder
    classifier = load_classifier(args.reader)
    paths, captions = captioned_images(folder, args.partial)
    images, found = load_images(paths, MIN_SIDE)
    pairs = read_both(images, captions, classifier)
    summary = agreement(pairs)
    out = output_dir(args.out, "agree")
    differing = disagreement_grid(pairs, images, out / "disagreements.png")
    record = {"folder": str(args.folder), "reader": str(args.reader), "images_found": found,
              "disagreeing_images": differing, "groups": summary,
              "disagreements": [{"image": paths[i].name, "caption": p.caption, "differ": p.disagreements(),
                                 "exact": p.exact.attributes() if p.exact is not None else None,
                                 "classifier": p.learned.attributes() if p.learned.has_object else None}
                                for i, p in enumerate(pairs) if p.disagreements()]}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.md").write_text(f"Agreement of the exact reader and the classifier ({args.reader}) on "
                                    f"{args.folder}, in % (attributes: over the images where both see an object); "
                                    f"{differing} images differ (disagreements.png):\n\n" + markdown(summary)
                                    + "\nSingle-object captions:\n\n"
                                    + confidence_markdown([p for p in pairs if p.objects == 1]))
    return out, record


def run_probe(args) -> dict:
    """Real renders of the held-out single-object scenes, noised to each --from timestep and denoised back with the
    config's model and guidance (DDIM, --steps steps); caption accuracy per t0 (evaluation/probe.py)."""
    import torch

    from configs import Config, load_config
    from data.synthetic import render, scene_at
    from evaluation.probe import SWAPPABLE, markdown, prediction_grid, probe_scenes
    from models.checkpoint import load_checkpoint, peek
    from models.text_encoder import load_text_encoder
    from pipeline.generate import check_device, check_prediction, guided_denoiser, text_encoder_config

    if args.swap is not None and args.swap not in SWAPPABLE:
        raise EvalError(f"--swap {args.swap!r}: swappable attributes are {', '.join(SWAPPABLE)}")
    if args.steps < 1:
        raise EvalError(f"--steps must be >= 1, got {args.steps}")
    if args.grid_scenes < 0:
        raise EvalError(f"--grid-scenes must be >= 0, got {args.grid_scenes}")
    cfg = load_config(Config, args.config, args.overrides)
    ec, s = cfg.evaluation, cfg.sample
    if cfg.autoencoder.kind != "pixel":
        raise EvalError(f"probe noises the renders themselves, so it needs a pixel-space model (autoencoder.kind: "
                        f"pixel, as the shapes presets); {args.config} uses {cfg.autoencoder.kind!r}")
    schedule = cfg.diffusion.build()
    bad = [t for t in args.timesteps if not 0 < t < schedule.num_steps]
    if bad:
        raise EvalError(f"--from timesteps must lie in 1..{schedule.num_steps - 1}, got {bad}")
    scenes = [scene_at(ec.seed, i, [(ec.width, ec.height)], ec.scene()) for i in range(ec.num_images)]
    scenes = [objects for _, _, objects in scenes if len(objects) == 1]
    if not scenes:
        raise EvalError(f"the {ec.num_images} held-out scenes hold no single-object scene: raise "
                        f"evaluation.num_images")
    real = torch.stack([torch.from_numpy(np.array(render(o, ec.width, ec.height))).permute(2, 0, 1)
                        for o in scenes]).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    if s.checkpoint is None:
        raise EvalError("no checkpoint to probe: set sample.checkpoint (--set sample.checkpoint=PATH)")
    check_prediction(peek(s.checkpoint), cfg.diffusion.prediction, s.checkpoint)
    check_device(s.device, "fp32")
    model, _, _ = load_checkpoint(s.checkpoint, device=s.device, dtype=torch.float32)
    model.eval()
    text_encoder = load_text_encoder(text_encoder_config(cfg), s.device)

    def denoise_for(captions):
        y, mask = text_encoder.encode(captions)
        return guided_denoiser(model, schedule, s, {"y": y.to(s.device), "mask": mask.to(s.device)},
                               prediction=cfg.diffusion.prediction)

    rows = probe_scenes(denoise_for, scenes, real.to(s.device), schedule, args.timesteps, args.steps, args.swap,
                        seed=s.seed)
    attribute = args.swap or "kind"  # what predictions.png varies
    grid = None
    if args.grid_scenes:
        n = min(args.grid_scenes, len(scenes))
        grid = prediction_grid(denoise_for, scenes[:n], real[:n].to(s.device), schedule, args.timesteps, attribute,
                               seed=s.seed)
    out = output_dir(args.out, "probe")
    if grid is not None:
        Image.fromarray(grid).save(out / "predictions.png")
    record = {"config": args.config, "overrides": list(args.overrides), "checkpoint": s.checkpoint,
              "guidance": s.guidance, "steps": args.steps, "swap": args.swap, "scenes": len(scenes),
              "held_out_seed": ec.seed, "rows": rows}
    (out / "results.json").write_text(json.dumps(record, indent=2))
    head = (f"Held-out single-object scenes: {len(scenes)}; real renders noised to t0 and denoised back by "
            f"{s.checkpoint} (DDIM {args.steps} steps, guidance {s.guidance})"
            + (f", captions naming another {args.swap} than the image shows" if args.swap else "") + "\n\n")
    tail = "" if grid is None else (
        f"\npredictions.png: per scene and t0 (rows {', '.join(map(str, args.timesteps))}), the noised render, then "
        f"the one-step data prediction under each {attribute} ({', '.join(SWAPPABLE[attribute])})\n")
    (out / "results.md").write_text(head + markdown(rows, args.swap) + "\n" + tail)
    return out, record


def run_fid(args) -> dict:
    import torch

    from evaluation.frechet import frechet_distance_of
    from evaluation.inception import load_fid_inception

    net = load_fid_inception(args.weights, args.device)
    feats = []
    for folder in (args.generated, args.real):
        images = load_images(image_files(folder), what=f"images of {folder}")[0]
        if len(images) < 2:
            raise EvalError(f"{folder}: FID needs at least 2 images, found {len(images)}")
        rows = []
        for start in range(0, len(images), args.batch_size):
            chunk = [torch.from_numpy(im).permute(2, 0, 1).float() / 255
                     for im in images[start:start + args.batch_size]]
            rows.append(torch.cat([net(c[None].to(args.device)) for c in chunk]).cpu().double().numpy())
        feats.append(np.concatenate(rows))
    fid = frechet_distance_of(feats[0], feats[1])
    out = output_dir(args.out, "fid")
    record = {"generated": str(args.generated), "real": str(args.real), "weights": str(args.weights),
              "generated_images": len(feats[0]), "real_images": len(feats[1]), "fid": fid}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.md").write_text(f"| generated | real | FID |\n|---|---|---|\n| {len(feats[0])} | {len(feats[1])} "
                                    f"| {fid:.3f} |\n")
    return out, record


def run_clip(args) -> dict:
    import torch

    from evaluation.clip_score import ClipScorer

    paths, captions = captioned_images(args.folder, args.partial)
    scorer = ClipScorer(args.clip, args.device)
    scores = []
    for start in range(0, len(paths), args.batch_size):
        batch = [torch.from_numpy(im).permute(2, 0, 1).float() / 255
                 for im in load_images(paths[start:start + args.batch_size])[0]]
        # images of one folder may differ in size: the processor resizes each, so score them one by one
        scores += [float(scorer(img[None], [text])[0]) for img, text in zip(batch, captions[start:start + len(batch)])]
    out = output_dir(args.out, "clip")
    record = {"folder": str(args.folder), "clip": str(args.clip), "images": len(scores),
              "clip_score": float(np.mean(scores)), "per_image": dict(zip((p.name for p in paths), scores))}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.md").write_text(f"| images | CLIP score |\n|---|---|\n"
                                    f"| {len(scores)} | {record['clip_score']:.2f} |\n")
    return out, record


def cell(value, spec: str = "") -> str:
    """A table cell: the value formatted, or "-" where the result has none (a folder's results have no sampler)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def run_table(args) -> tuple[None, dict]:
    """One Markdown row per results.json: the setting, single- and multi-object accuracy, FD, seconds per image."""
    header = ("| model | sampler | steps | guidance | single: kind | colour | size | position | count | all "
              "| multi: all attributes | multi: count | FD | s/image |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for folder in args.results:
        path = folder / "results.json" if folder.is_dir() else folder
        if not path.is_file():
            raise EvalError(f"{folder} holds no results.json (an output folder of `evaluate.py model` or `folder`)")
        r = json.loads(path.read_text())
        one, many = r["groups"].get("single", {}), r["groups"].get("multi", {})
        multi_all = (sum(many.get(a, 0) for a in ("kind", "color", "size", "position")) / 4) if many else None
        source = r.get("checkpoint") or r.get("config", "?")
        model = args.label or (Path(r["folder"]).name if r.get("folder") else Path(source).stem)
        rows.append(f"| {model} | {cell(r.get('sampler'))} | {cell(r.get('steps'))} | {cell(r.get('guidance'))} | "
                    + " | ".join(cell(one.get(k), ".1f") for k in ("kind", "color", "size", "position", "count",
                                                                    "all"))
                    + f" | {cell(multi_all, '.1f')} | {cell(many.get('count'), '.1f')} | "
                      f"{cell(r.get('frechet_distance'), '.3f')} | {cell(r.get('seconds_per_image'), '.4f')} |")
    print("\n".join(rows))
    return None, {}


def output_dir(root: Path, name: str) -> Path:
    from engine.state import new_run_dir

    return new_run_dir(root, name)


def parse_args(argv=None) -> argparse.Namespace:
    from configs.loader import add_config_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=Path("outputs/eval"), help="results go to a numbered folder here")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")

    model = sub.add_parser("model", parents=[common], help="generate the held-out captions with a config, score them")
    add_config_arguments(model, default="shapes_teacher")
    model.add_argument("--control-sets", nargs="*", default=["agree", "conflict", "colour"],
                       choices=["agree", "conflict", "colour"],
                       help="with --control, also these single-object sets (evaluation/control.py): the caption "
                            "agrees with the map, names another kind at another place, or only the colour "
                            "(default: all three; none: skip)")
    model.add_argument("--control", action="store_true",
                       help="steer each image by its scene's edge map through control.checkpoint (a ControlNet "
                            "branch) and also report edge agreement (F1 of Canny edges against the map)")

    folder = sub.add_parser("folder", parents=[common], help="score a folder of shapes images against their captions")
    folder.add_argument("folder", type=Path)
    folder.add_argument("--real", type=Path, help="a folder of real images for the Frechet distance")
    folder.add_argument("--partial", action="store_true", help="score only images that have a caption")

    fid = sub.add_parser("fid", parents=[common], help="FID between two image folders (Inception-v3 pool features)")
    fid.add_argument("generated", type=Path)
    fid.add_argument("real", type=Path)
    fid.add_argument("--weights", type=Path, required=True, help="pt_inception-2015-12-05-6726825d.pth")
    fid.add_argument("--device", default="cpu")
    fid.add_argument("--batch-size", type=int, default=32)

    probe = sub.add_parser("probe", parents=[common], help="noise real renders to timestep t0, denoise them back "
                           "with the caption, score: where does the model decide each attribute? (slow: with the "
                           "defaults over 15 minutes on 2 CPU cores for --swap kind)")
    add_config_arguments(probe, default="shapes_teacher")
    probe.add_argument("--from", dest="timesteps", type=lambda v: [int(t) for t in v.split(",")],
                       default=[100, 200, 300, 400, 500, 600, 800, 999], metavar="T0,T0,...",
                       help="starting timesteps (default 100,200,300,400,500,600,800,999)")
    probe.add_argument("--steps", type=int, default=10, help="DDIM steps from t0 to 0 (default 10)")
    probe.add_argument("--swap", metavar="ATTRIBUTE",
                       help="caption each image with another value of this attribute (kind, color, size) than it "
                            "shows: does the model follow the caption or the image?")
    probe.add_argument("--grid-scenes", type=int, default=2, metavar="N",
                       help="predictions.png: for the first N scenes, the model's data prediction from each t0 "
                            "under every value of the --swap attribute (default kind); 0: none (default 2)")

    agree = sub.add_parser("agree", parents=[common], help="read a folder of captioned images with both shapes "
                           "readers (exact and classifier): agreement per attribute, disagreements.png")
    agree.add_argument("folder", type=Path, help="a `model` output folder (its images/) or any captioned folder")
    agree.add_argument("--reader", type=Path, default=Path("weights/shapes/reader.safetensors"),
                       help="the classifier's weights (default: the shipped weights/shapes/reader.safetensors)")
    agree.add_argument("--partial", action="store_true", help="read only images that have a caption")

    table = sub.add_parser("table", help="a Markdown table of `model` results (results.json files or their folders)")
    table.add_argument("results", type=Path, nargs="+")
    table.add_argument("--label", help="name of the model column (default: the checkpoint's file name)")

    clip = sub.add_parser("clip", parents=[common], help="CLIP score of a folder of images against their captions")
    clip.add_argument("folder", type=Path)
    clip.add_argument("--clip", type=Path, required=True, help="a transformers CLIP folder")
    clip.add_argument("--device", default="cpu")
    clip.add_argument("--batch-size", type=int, default=32)
    clip.add_argument("--partial", action="store_true", help="score only images that have a caption")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    commands = {"model": run_model, "folder": run_folder, "probe": run_probe, "fid": run_fid, "clip": run_clip,
                "table": run_table, "agree": run_agree}
    try:
        out, record = commands[args.command](args)
        if out is None:
            return 0
    except UserError as e:  # every bad input: config, captions, weights, checkpoints, sampling settings
        log.error("error: %s", e)
        return 2
    log.info("results in %s", out)
    md = out / "results.md"
    print(md.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
