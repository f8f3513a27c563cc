"""HED soft edges (the ControlNet annotator network PixArt-delta's ControlNet was trained with), written here.

Loads the public weights file ControlNetHED.pth (hub repo lllyasviel/Annotators) when the user has it; nothing is
downloaded. Layout: `norm` (1, 3, 1, 1), then five stages `block{1..5}` of 3x3 convolutions + ReLU (`convs.{j}`;
64, 128, 256, 512, 512 channels; 2, 2, 3, 3, 3 convolutions), the later four after a 2x2 max-pool, each with a
1x1 `projection` to one channel. The edge map is the sigmoid of the mean of the five projections, each resized
bilinearly to the input size; the input is RGB in 0..255 minus `norm`.

    net = load_hed("ControlNetHED.pth")
    edges = hed_edges(net, images)        # images (N, 3, H, W) in [0, 1] -> (N, 1, H, W) in [0, 1]
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError

STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))  # in, out, convolutions


class HEDError(UserError):
    """A HED weights file that is missing or of another network; the message names the fix."""


class HEDStage(nn.Module):
    def __init__(self, c_in: int, c_out: int, convs: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(c_in if j == 0 else c_out, c_out, 3, padding=1) for j in range(convs)])
        self.projection = nn.Conv2d(c_out, 1, 1)

    def forward(self, h: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            h = F.max_pool2d(h, 2, 2)
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.projection(h)


class HEDNetwork(nn.Module):
    """Five VGG-like stages with side outputs (the ControlNetHED layout)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for i, (c_in, c_out, convs) in enumerate(STAGES, start=1):
            self.add_module(f"block{i}", HEDStage(c_in, c_out, convs))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (N, 3, H, W) RGB in 0..255 -> five side outputs (N, 1, H / 2^i, W / 2^i)."""
        h, sides = x - self.norm, []
        for i in range(1, len(STAGES) + 1):
            h, side = getattr(self, f"block{i}")(h, pool=i > 1)
            sides.append(side)
        return sides


def load_hed(path: str | Path, device: str | torch.device = "cpu") -> HEDNetwork:
    """The HED network with the weights of `path` (ControlNetHED.pth), frozen, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise HEDError(f"HED weights {path} not found: get ControlNetHED.pth (hub repo lllyasviel/Annotators) and "
                       f"pass its path (nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HEDError(f"cannot read HED weights {path}: {type(e).__name__}: {str(e)[:200]}") from e
    net = HEDNetwork()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise HEDError(f"{path} is not a ControlNetHED weights file: missing {missing[:4]}, unexpected "
                       f"{unexpected[:4]}, wrong shapes {wrong[:4]}")
    net.load_state_dict(state)
    return net.eval().requires_grad_(False).to(device)


@torch.no_grad()
def hed_edges(net: HEDNetwork, images: torch.Tensor) -> torch.Tensor:
    """Soft edges (N, 1, H, W) in [0, 1] of RGB images (N, 3, H, W) in [0, 1]."""
    h, w = images.shape[-2:]
    sides = net(images.float() * 255.0)
    sides = torch.cat([F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False) for s in sides], dim=1)
    return torch.sigmoid(sides.mean(dim=1, keepdim=True)).clamp(0, 1)
