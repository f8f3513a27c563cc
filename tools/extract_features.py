"""Encode an image-caption data set into the feature cache the trainers read (VAE latents + T5 features).

    python tools/extract_features.py DATA_DIR CACHE_DIR --base-size 256 --text-encoder T5 --autoencoder VAE
    python tools/extract_features.py DATA_DIR CACHE_DIR --config pixart_xl2_256 --control edge --on-error skip
    torchrun --nproc_per_node 8 tools/extract_features.py DATA_DIR CACHE_DIR ...   # rank r takes records i % 8 == r

Each image goes to its aspect-ratio bucket (bins of --base-size, sides a multiple of 2 x the autoencoder's
downsampling, i.e. of the patch size in latent space), is resized to cover it and center-cropped, encoded by the
VAE (posterior mean: deterministic); its caption is encoded by T5. --control edge also encodes the record's
edge map (JSONL "edge" / edges/<key>.png), --control canny a Canny edge map of the image.

Resumable: a sample whose file exists with the same settings and caption is not recomputed. Files are written
atomically and index.jsonl is rebuilt at the end from the files, so an interrupted run leaves no half index.
Bad inputs (missing or unreadable images, missing captions) are skipped and listed (--on-error skip) or stop the
run (--on-error stop, exit 1); CACHE/report.json records either. Usage errors (missing DATA_DIR, no examples,
missing model folders) exit 2 before anything is loaded.
"""

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from common.files import atomic_path
from configs import Config, ConfigError, add_config_arguments, load_config
from data.edges import canny, edges_to_control
from data.features import (
    REPORT_NAME,
    prepare_image,
    read_sample_metadata,
    sample_file,
    write_index,
    write_sample,
)
from data.folder import DataError, ImageCaptionFolder, Problem, Record, load_image
from models.aspect_ratios import aspect_ratio_bins, closest_bin
from models.autoencoder import AutoencoderConfig, AutoencoderError, load_autoencoder, resolve_vae
from models.text_encoder import TextEncoderConfig, TextEncoderError, load_text_encoder, resolve_text_encoder

log = logging.getLogger("extract_features")

CONTROLS = ("none", "edge", "canny")
ON_ERROR = ("skip", "stop")
PATCH_SIZE = 2  # PixArt's patch size in latent space: bucket sides are multiples of 2 x the VAE downsampling
CANNY = {"sigma": 1.0, "low": 0.1, "high": 0.2}
DONE_PREFIX = ".done-rank-"


class SampleError(DataError):
    """A bad input that stopped the run (--on-error stop); the message names the file."""


@dataclass
class Prepared:
    """One record ready to encode."""

    record: Record
    bucket: str
    size: tuple[int, int]             # (height, width) pixels of the bucket
    image: torch.Tensor               # (3, height, width) in [-1, 1]
    control: torch.Tensor | None      # (3, height, width) in [-1, 1], or None


def settings_of(text_encoder: TextEncoderConfig, autoencoder: AutoencoderConfig, base_size: int,
                control: str) -> tuple[dict, int]:
    """(What every sample's features depend on, the bucket side multiple), from the configs alone (no weights)."""
    model_dir, _ = resolve_text_encoder(text_encoder.path)
    te = {"path": str(model_dir), "max_tokens": text_encoder.max_tokens, "clean_captions": text_encoder.clean_captions,
          "dtype": text_encoder.dtype, "load_in_8bit": text_encoder.load_in_8bit}
    if autoencoder.kind == "pixel":
        ae, downsample = {"kind": "pixel"}, 1
    else:
        folder, config = resolve_vae(autoencoder.path)
        downsample = 2 ** (len(config.get("block_out_channels", (1, 1, 1, 1))) - 1)
        ae = {"kind": autoencoder.kind, "path": str(folder), "scale": autoencoder.scale, "dtype": autoencoder.dtype}
    multiple = PATCH_SIZE * downsample
    settings = {"text_encoder": te, "autoencoder": ae, "base_size": base_size, "multiple": multiple,
                "control": control}
    if control == "canny":
        settings["canny"] = CANNY
    return settings, multiple


def is_up_to_date(path: Path, record: Record, settings_json: str) -> dict | None:
    """The file's metadata if it holds this record's features under these settings, else None."""
    meta = read_sample_metadata(path)
    if meta is None or meta.get("key") != record.key or meta.get("caption") != record.caption:
        return None
    return meta if meta.get("settings") == settings_json else None


def prepare(record: Record, bins: dict[str, tuple[int, int]], control: str) -> Prepared:
    """Load, bucket, resize and crop one record (and its control map); DataError names a bad file."""
    image = load_image(record.image)
    w, h = image.size
    bucket, (height, width) = closest_bin(h, w, bins)
    x = prepare_image(image, height, width)  # (3, H, W)
    c = None
    if control == "edge":
        if record.control is None:
            raise DataError(f"no edge map for {str(record.image)!r} (--control edge needs an \"edge\" path in the "
                            f"JSONL line, or edges/{record.key}.png beside the images)")
        edge = load_image(record.control)
        ew, eh = edge.size
        if abs(ew / eh - w / h) > 0.01 * w / h:
            raise DataError(f"edge map {str(record.control)!r} is {ew}x{eh} but its image {str(record.image)!r} "
                            f"is {w}x{h}: the aspect ratios must match")
        c = prepare_image(edge, height, width)  # (3, H, W)
    elif control == "canny":
        c = edges_to_control(canny((x + 1) / 2, **CANNY))  # (3, H, W)
    return Prepared(record, bucket, (height, width), x, c)


def encode_batch(ready: list[Prepared], text_encoder, autoencoder) -> list[dict[str, torch.Tensor]]:
    """Tensors of each prepared record: latent (C, h, w) f32, y (L, D), mask (L,) int8, control (C, h, w)?."""
    y, mask = text_encoder.encode([p.record.caption for p in ready])  # (N, L, D), (N, L)
    out = [{"y": y[i].cpu().clone(), "mask": mask[i].to(torch.int8).cpu()} for i in range(len(ready))]
    for size in dict.fromkeys(p.size for p in ready):  # the VAE needs one image size per call
        idx = [i for i, p in enumerate(ready) if p.size == size]
        images = torch.stack([ready[i].image for i in idx])  # (n, 3, H, W)
        latents = autoencoder.encode(images, sample=False).float().cpu()  # (n, C, H/f, W/f), posterior mean
        for j, i in enumerate(idx):
            out[i]["latent"] = latents[j].clone()
        if ready[idx[0]].control is not None:
            controls = torch.stack([ready[i].control for i in idx])  # (n, 3, H, W)
            encoded = autoencoder.encode(controls, sample=False).float().cpu()  # (n, C, H/f, W/f)
            for j, i in enumerate(idx):
                out[i]["control"] = encoded[j].clone()
    return out


def _bad_input(key: str, reason: str, on_error: str, part: dict) -> None:
    """Skip and list a bad input, or stop the run naming it."""
    if on_error == "stop":
        part["errors"].append({"key": key, "reason": reason})
        raise SampleError(f"{reason} (--on-error stop: fix or remove it, or pass --on-error skip)")
    log.warning("skipping %s: %s", key, reason)
    part["skipped"].append({"key": key, "reason": reason})


def encode_shard(records: list[Record], cache_dir: Path, settings: dict, multiple: int, text_encoder_cfg,
                 autoencoder_cfg, control: str, on_error: str, batch_size: int, device: str, progress: bool,
                 rank: int, part: dict) -> None:
    """Write the sample files of `records` that are missing or stale; counts and bad inputs go into `part`."""
    settings_json = json.dumps(settings, sort_keys=True)
    todo = [r for r in records if is_up_to_date(cache_dir / sample_file(r.key), r, settings_json) is None]
    part["up_to_date"] = len(records) - len(todo)
    log.info("%d of %d examples already extracted, %d to do", part["up_to_date"], len(records), len(todo))
    if not todo:
        return
    text_encoder = load_text_encoder(text_encoder_cfg, device)
    autoencoder = load_autoencoder(autoencoder_cfg, device)
    if PATCH_SIZE * autoencoder.downsample != multiple:
        raise AutoencoderError(f"autoencoder downsamples by {autoencoder.downsample}, but its config.json "
                               f"implied {multiple // PATCH_SIZE}")
    bins = aspect_ratio_bins(settings["base_size"], multiple)
    with tqdm(total=len(todo), desc=f"features rank {rank}", position=rank, disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            ready = []
            for record in chunk:
                try:
                    ready.append(prepare(record, bins, control))
                except DataError as e:
                    _bad_input(record.key, str(e), on_error, part)
            if ready:
                for p, tensors in zip(ready, encode_batch(ready, text_encoder, autoencoder)):
                    metadata = {"key": p.record.key, "caption": p.record.caption, "image": str(p.record.image),
                                "bucket": p.bucket, "height": str(p.size[0]), "width": str(p.size[1]),
                                "settings": settings_json}
                    write_sample(cache_dir / sample_file(p.record.key), tensors, metadata)
                part["processed"] += len(ready)
            bar.update(len(chunk))


def collect_index(records: list[Record], cache_dir: Path, settings_json: str) -> tuple[list[dict], list[int]]:
    """(Index entries read from the up-to-date sample files, positions of records that have none)."""
    entries, missing = [], []
    for i, record in enumerate(records):
        file = sample_file(record.key)
        meta = is_up_to_date(cache_dir / file, record, settings_json)
        if meta is None:
            missing.append(i)
            continue
        entries.append({"key": record.key, "bucket": meta["bucket"], "height": int(meta["height"]),
                        "width": int(meta["width"]), "caption": meta["caption"], "file": file})
    return entries, missing


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def wait_for_ranks(records: list[Record], cache_dir: Path, world_size: int, settings_json: str,
                   skipped_by_rank0: set[str], timeout: float | None) -> tuple[list[dict], list[dict] | None]:
    """Rank 0's barrier: (the other ranks' reports, the index entries; None if a rank failed).

    Each rank r > 0 writes CACHE/.done-rank-r when it ends. A done file left by an older, interrupted run is
    recognised because some of its records have neither an up-to-date file nor a skip entry: then keep waiting.
    """
    began, last_log, checked = time.monotonic(), time.monotonic(), None
    while True:
        parts, stamps = {}, []
        for r in range(1, world_size):
            path = cache_dir / f"{DONE_PREFIX}{r}"
            try:
                part = json.loads(path.read_text(encoding="utf-8"))
                stamps.append(path.stat().st_mtime_ns)
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if part.get("world_size") == world_size and part.get("settings") == settings_json:
                parts[r] = part
        if len(parts) == world_size - 1 and stamps != checked:
            if any(p["status"] != "ok" for p in parts.values()):
                return list(parts.values()), None
            checked = stamps
            entries, missing = collect_index(records, cache_dir, settings_json)
            skipped = skipped_by_rank0.union(*({s["key"] for s in p["skipped"]} for p in parts.values()))
            stale = {i % world_size for i in missing if records[i].key not in skipped}
            if 0 in stale:
                raise RuntimeError(f"rank 0 left records without files: {[records[i].key for i in missing][:5]}")
            if not stale:
                return list(parts.values()), entries
        now = time.monotonic()
        if timeout is not None and now - began > timeout:
            raise DataError(f"ranks {sorted(set(range(1, world_size)) - set(parts))} did not finish within "
                            f"{timeout:.0f} s (no {DONE_PREFIX}<rank> file in {cache_dir})")
        if now - last_log > 60:
            log.info("waiting for ranks %s to finish", sorted(set(range(1, world_size)) - set(parts)))
            last_log = now
        time.sleep(0.2)


def extract(data_dir: str | Path, cache_dir: str | Path, text_encoder: TextEncoderConfig | None = None,
            autoencoder: AutoencoderConfig | None = None, *, base_size: int = 256, control: str = "none",
            on_error: str = "skip", batch_size: int = 8, device: str | None = None, captions: str = "auto",
            rank: int | None = None, world_size: int | None = None, progress: bool = True,
            barrier_timeout: float | None = None) -> dict:
    """Extract DATA_DIR's features into CACHE_DIR; returns the report (rank 0: of all ranks, else its own part).

    rank / world_size default to the RANK / WORLD_SIZE environment (torchrun); no process group is needed.
    The text encoder's own caption cache (text_encoder.cache_dir) is not used: the feature cache replaces it.
    Raises DataError / TextEncoderError / AutoencoderError for unusable arguments (before loading anything)
    and SampleError for a bad input under on_error="stop".
    """
    text_encoder = replace(text_encoder or TextEncoderConfig(), cache_dir=None)
    autoencoder = autoencoder or AutoencoderConfig()
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if control not in CONTROLS:
        raise DataError(f"control={control!r} is not one of {', '.join(CONTROLS)}")
    if on_error not in ON_ERROR:
        raise DataError(f"on_error={on_error!r} is not one of {', '.join(ON_ERROR)}")
    if batch_size < 1 or base_size < 16:
        raise DataError(f"batch_size must be >= 1 and base_size >= 16, got {batch_size} and {base_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    if not data_dir.is_dir():
        raise DataError(f"DATA_DIR {str(data_dir)!r} does not exist or is not a folder")
    settings, multiple = settings_of(text_encoder, autoencoder, base_size, control)
    settings_json = json.dumps(settings, sort_keys=True)
    folder = ImageCaptionFolder(data_dir, captions)
    if not folder.records and not folder.problems:
        raise DataError(f"DATA_DIR {str(data_dir)!r} holds no examples: expected images with a .txt caption "
                        f"beside each, or a metadata.jsonl of {{\"image\", \"caption\"}} lines")

    cache_dir.mkdir(parents=True, exist_ok=True)
    done_path = cache_dir / f"{DONE_PREFIX}{rank}"
    done_path.unlink(missing_ok=True)
    problems: list[Problem] = folder.problems if rank == 0 else []  # rank 0 reports the scan's problems
    part = {"rank": rank, "world_size": world_size, "settings": settings_json, "status": "running",
            "processed": 0, "up_to_date": 0, "skipped": [], "errors": []}
    mine = [r for i, r in enumerate(folder.records) if i % world_size == rank]
    try:
        if folder.problems and on_error == "stop":  # every rank scanned the same problems: all stop at once
            first = folder.problems[0]
            _bad_input(first.key, first.reason, on_error, part)
        for problem in problems:  # skip: listed once, by rank 0
            _bad_input(problem.key, problem.reason, on_error, part)
        if not folder.records:
            raise DataError(f"DATA_DIR {str(data_dir)!r} has no usable examples: all {len(folder.problems)} "
                            f"have problems, e.g. {folder.problems[0].reason}")
        encode_shard(mine, cache_dir, settings, multiple, text_encoder, autoencoder, control, on_error, batch_size,
                     device, progress, rank, part)
        part["status"] = "ok"
    except BaseException as e:
        part["status"] = "failed"
        if not part["errors"]:
            part["errors"].append({"key": None, "reason": f"{type(e).__name__}: {e}"})
        if rank == 0:
            _write_json(cache_dir / REPORT_NAME, _report([part], folder, data_dir, settings, None))
        raise
    finally:
        if rank != 0:
            _write_json(done_path, part)
    if rank != 0:
        return part

    others, entries = ([], None) if world_size == 1 else wait_for_ranks(
        folder.records, cache_dir, world_size, settings_json, {s["key"] for s in part["skipped"]}, barrier_timeout)
    if world_size == 1:
        entries, _ = collect_index(folder.records, cache_dir, settings_json)
    if entries is not None:
        write_index(cache_dir, entries)
    report = _report([part, *others], folder, data_dir, settings, entries)
    _write_json(cache_dir / REPORT_NAME, report)
    for r in range(1, world_size):
        (cache_dir / f"{DONE_PREFIX}{r}").unlink(missing_ok=True)
    if report["status"] != "ok":
        error = report["errors"][0]
        raise SampleError(f"rank {error['rank']} stopped: {error['reason']}")
    log.info("%d samples indexed in %s (%d new, %d already there, %d skipped); report in %s", report["indexed"],
             cache_dir, report["processed"], report["up_to_date"], len(report["skipped"]), cache_dir / REPORT_NAME)
    return report


def _report(parts: list[dict], folder: ImageCaptionFolder, data_dir: Path, settings: dict,
            entries: list[dict] | None) -> dict:
    """report.json: counts, skipped and error lists of all ranks."""
    ok = all(p["status"] == "ok" for p in parts)
    return {
        "status": "ok" if ok else "failed",
        "data_dir": str(data_dir),
        "examples": len(folder.records) + len(folder.problems),
        "processed": sum(p["processed"] for p in parts),
        "up_to_date": sum(p["up_to_date"] for p in parts),
        "skipped": sorted((s for p in parts for s in p["skipped"]), key=lambda s: s["key"]),
        "errors": [{"rank": p["rank"], **e} for p in parts for e in p["errors"]],
        "indexed": len(entries) if entries is not None else None,
        "world_size": parts[0]["world_size"],
        "settings": settings,
    }


def configs_from_args(args) -> tuple[TextEncoderConfig, AutoencoderConfig]:
    """The text_encoder / autoencoder sections of --config and --set, with the command-line flags applied."""
    cfg = load_config(Config, args.config, args.overrides) if args.config or args.overrides else Config()
    text_encoder, autoencoder = cfg.text_encoder, cfg.autoencoder
    if args.text_encoder:
        text_encoder = replace(text_encoder, path=args.text_encoder)
    if args.dtype:
        text_encoder = replace(text_encoder, dtype=args.dtype)
    if args.autoencoder == "pixel":
        autoencoder = replace(autoencoder, kind="pixel")
    elif args.autoencoder:
        autoencoder = replace(autoencoder, kind="sd-vae", path=args.autoencoder)
    return text_encoder, autoencoder


def main(argv=None) -> int:
    """Parse arguments and run; exit 0 done, 1 a bad input stopped the run, 2 unusable arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="images + .txt captions, or a folder with metadata.jsonl")
    parser.add_argument("cache_dir", type=Path, help="feature cache to create or complete")
    parser.add_argument("--base-size", type=int, default=256, help="side of the square bin: 256, 512, 1024")
    parser.add_argument("--text-encoder", metavar="PATH", help="T5 folder or pipeline root (default: config)")
    parser.add_argument("--autoencoder", metavar="PATH|pixel", help="VAE folder, pipeline root, or 'pixel'")
    parser.add_argument("--control", choices=CONTROLS, default="none", help="also encode a control map")
    parser.add_argument("--on-error", choices=ON_ERROR, default="skip", help="on a bad input: skip it or stop")
    parser.add_argument("--batch-size", type=int, default=8, help="images per encoder call")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="T5 dtype = stored caption feature dtype")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--captions", choices=("auto", "txt", "jsonl"), default="auto", help="caption source")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    prefix = f"[rank {rank}] " if world > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prefix}%(name)s: %(message)s", stream=sys.stdout)
    try:
        text_encoder, autoencoder = configs_from_args(args)
        if args.print_config:
            sections = {"text_encoder": asdict(text_encoder), "autoencoder": asdict(autoencoder)}
            print(yaml.safe_dump(sections, sort_keys=False), end="")
            return 0
        extract(args.data_dir, args.cache_dir, text_encoder, autoencoder, base_size=args.base_size,
                control=args.control, on_error=args.on_error, batch_size=args.batch_size, device=args.device,
                captions=args.captions, progress=not args.no_progress)
    except SampleError as e:
        log.error("error: %s", e)
        return 1
    except (DataError, TextEncoderError, AutoencoderError, ConfigError) as e:
        log.error("error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
