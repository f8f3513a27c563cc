"""Where training reports go: stdout, the run's log.txt and TensorBoard (main process only); sample grids as PNG."""

import logging
import math
import resource
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

log = logging.getLogger("train")
FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(run_dir: Path | None, is_main: bool) -> None:
    """INFO to stdout and run_dir/log.txt on the main process; warnings only elsewhere."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    for handler in list(root.handlers):  # replaces the entry script's basicConfig and any earlier run's handlers
        if getattr(handler, "_pixart", False) or type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    handlers = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and is_main:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._pixart = True
        root.addHandler(handler)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Monitor:
    """Scalars to stdout / log.txt / TensorBoard, images to PNG and TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir = run_dir
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        text = " ".join(f"{k.removeprefix('train/')} {v:.4g}" for k, v in values.items())
        log.info("step %d: %s", step, text)

    def images(self, step: int, images: torch.Tensor, tag: str = "samples") -> Path | None:
        """Write a grid of (N, 3, H, W) images in [0, 1] to run_dir/samples/step_NNNNNNNN.png."""
        if self.writer is None:
            return None
        grid = make_grid(images.float().clamp(0, 1), nrow=math.ceil(math.sqrt(len(images))), padding=2)
        path = self.run_dir / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).cpu().numpy()).save(path)
        self.writer.add_image(tag, grid, step)
        self.writer.flush()
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
