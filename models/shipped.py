"""Weights that live in the repository (weights/): a MANIFEST.json of sizes and hashes, checked before loading.

    weights/shapes/MANIFEST.json   {"format": ..., "files": {"teacher.safetensors": {"bytes", "sha256"}, ...},
                                    "models": {"teacher": {"files", "command", "config", "evaluation"}, ...}}

A file listed in a manifest that is missing (a clone without the weights) or differs from its recorded hash (an
edited or truncated file) is an error that says which, and how to get the right one back.
"""

import hashlib
import json
import os
from pathlib import Path

from common.errors import UserError

MANIFEST_NAME = "MANIFEST.json"
FORMAT = "pixart-delta-shipped/1"


class ShippedWeightsError(UserError):
    """A shipped weights file that is missing or changed; the message names it and the fix."""


def sha256_of(path: Path) -> str:
    """sha256 of a file; remembered per (path, size, modification time), so checks that hash one multi-GB
    checkpoint several times (a config check, then the task that loads it) read it once."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


_HASHES: dict[tuple[str, int, int], str] = {}


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (their relative names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_of(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_of(file)}\n".encode())
    return digest.hexdigest()


def find_manifest(path: str | os.PathLike, levels: int = 3) -> Path | None:
    """The MANIFEST.json in the folder of `path` or one of its `levels` parents, if any."""
    here = Path(path).absolute()
    for folder in [here if here.is_dir() else here.parent, *here.parents][:levels + 1]:
        if (folder / MANIFEST_NAME).is_file():
            return folder / MANIFEST_NAME
    return None


def read_manifest(manifest: Path) -> dict:
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShippedWeightsError(f"cannot read {manifest}: {e} (restore it with: git checkout -- {manifest})") from e
    if data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise ShippedWeightsError(f"{manifest} is not a shipped-weights manifest ({FORMAT})")
    return data


def verify_shipped(path: str | os.PathLike) -> None:
    """If `path` (a file or folder) is covered by a manifest, check every file of it it lists; else do nothing."""
    manifest = find_manifest(path)
    if manifest is None:
        return
    root = manifest.parent
    target = Path(path).absolute()
    try:
        rel = target.relative_to(root).as_posix()
    except ValueError:
        return
    files = read_manifest(manifest)["files"]
    listed = {name: entry for name, entry in files.items() if name == rel or name.startswith(rel + "/") or rel == "."}
    for name, entry in sorted(listed.items()):
        file = root / name
        restore = f"`git checkout -- {file}` in a full clone of the repository"
        if not file.is_file():
            raise ShippedWeightsError(
                f"shipped weights file {file} is missing (listed in {manifest}): a clone without the weights? "
                f"get it back with {restore} (the weights are ordinary files of the repository, no git lfs)")
        size = file.stat().st_size
        if size != entry["bytes"] or sha256_of(file) != entry["sha256"]:
            raise ShippedWeightsError(
                f"shipped weights file {file} differs from the one recorded in {manifest} ({size} bytes, recorded "
                f"{entry['bytes']}; sha256 differs): restore it with {restore}, or rebuild it with "
                f"{files_command(manifest, name)}")


def files_command(manifest: Path, name: str) -> str:
    """The command that made a listed file, from the manifest's models section."""
    for model in read_manifest(manifest).get("models", {}).values():
        if name in model.get("files", []):
            return model.get("command", "its recipe")
    return "its recipe"


def write_manifest(root: Path, models: dict[str, dict]) -> Path:
    """MANIFEST.json for the files each model lists (relative to root): their sizes and sha256."""
    files = {}
    for model in models.values():
        for name in model["files"]:
            file = root / name
            files[name] = {"bytes": file.stat().st_size, "sha256": sha256_of(file)}
    path = root / MANIFEST_NAME
    path.write_text(json.dumps({"format": FORMAT, "files": dict(sorted(files.items())), "models": models},
                               indent=2) + "\n")
    return path
