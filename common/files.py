"""Atomic writes: a file or folder is written under a temporary name beside its destination, then renamed over it,
so an interrupted write never leaves a half-written file under the real name. No torch: configs use it too."""

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from common.errors import CheckpointError

TRAIN_STATE_FORMAT = "pixart-delta-train-state"  # the "format" tag of engine/state.py's training checkpoints


def training_state_message(path) -> str:
    """What to do with a training checkpoint where weights were expected (readers recognise the tag above)."""
    return (f"{path} is a training checkpoint (model, optimiser and RNG state for --resume), not weights: use the "
            f"run's ema.safetensors (or weights.safetensors), which every checkpoint step exports, or export this "
            f"step's weights with `python tools/convert_checkpoint.py {path} OUT.safetensors --to safetensors`")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure delete it.

    The temporary name is unique (pid + random). The result gets the usual permissions of new files (the umask's),
    also when the writer makes private files (safetensors writes 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.touch()
    mode = tmp.stat().st_mode & 0o777  # what a new file gets here
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def normalise_modes(folder: Path) -> None:
    """Give every file and folder under `folder` the permissions new ones get here (private writers aside)."""
    probe = folder / f".mode-probe-{uuid.uuid4().hex[:8]}"
    probe.touch()
    file_mode = probe.stat().st_mode & 0o777
    probe.unlink()
    dir_mode = folder.stat().st_mode & 0o777  # made by os.mkdir: the umask's
    for item in folder.rglob("*"):
        os.chmod(item, dir_mode if item.is_dir() else file_mode)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace_existing: bool = False):
    """Yield a new empty folder beside `path`; on success it becomes `path` (an existing `path` is removed first if
    replace_existing, else it is an error), on failure it is deleted. Made with os.mkdir, so it has the usual
    permissions of new folders (tempfile's are private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace_existing:
        raise CheckpointError(f"{path} already exists; remove it or choose another destination")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        normalise_modes(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def print_report(text: str, out: str | os.PathLike | None) -> None:
    """Print a report (a Markdown table) to stdout and, when `out` is given, write it there whole (atomic_path)."""
    print(text, end="")
    if out is not None:
        with atomic_path(out) as tmp:
            Path(tmp).write_text(text)
