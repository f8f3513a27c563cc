"""FID's Inception-v3 feature network, written here, loading the weights file users bring.

The standard FID features are the 2048-dim average-pool output of the TensorFlow Inception graph of 2015, whose
PyTorch port is the file `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid). It is Inception-v3 with two quirks
of that graph: the average pools of the mixed blocks ignore zero padding, and the last block max-pools. Module
names follow the file's keys (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...).

    net = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")
    feats = net(images)   # (N, 3, H, W) in [0, 1] -> (N, 2048)
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # padding not counted (TF)


class MixedA(nn.Module):
    """Mixed_5b-d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = ConvBN(cin, 48, 1), ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], dim=1)


class ReduceB(nn.Module):
    """Mixed_6a: stride-2 3x3 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class MixedC(nn.Module):
    """Mixed_6b-e: factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = ConvBN(cin, c7, 1), ConvBN(c7, c7, **row), \
            ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = ConvBN(c7, c7, **col), ConvBN(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = ConvBN(c7, c7, **col), ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
            self.branch_pool(_avg_pool(x)),
        ], dim=1)


class ReduceD(nn.Module):
    """Mixed_7a: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = ConvBN(cin, 192, 1), ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class MixedE(nn.Module):
    """Mixed_7b-c: expanded 3x3 branches (1x3 and 3x1 side by side); Mixed_7c max-pools its pool branch."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = ConvBN(384, 384, **row), ConvBN(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = ConvBN(cin, 448, 1), ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = ConvBN(384, 384, **row), ConvBN(384, 384, **col)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInception(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> 2048-dim pool features; inputs are resized to 299x299 (bilinear)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = MixedA(192, 32), MixedA(256, 64), MixedA(288, 64)
        self.Mixed_6a = ReduceB(288)
        self.Mixed_6b, self.Mixed_6c = MixedC(768, 128), MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = MixedC(768, 160), MixedC(768, 192)
        self.Mixed_7a = ReduceD(768)
        self.Mixed_7b, self.Mixed_7c = MixedE(1280, max_pool=False), MixedE(2048, max_pool=True)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (N, 2048)


class WeightsError(UserError):
    """A metric network's weights file that is missing or does not fit; the message says what to get."""


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInception:
    """The FID network with the weights of `path` (pytorch-fid's .pth; its classifier `fc.*` is not needed)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"FID Inception weights {str(path)!r} not found; the usual file is {WEIGHTS_NAME} "
                           f"(pytorch-fid's release assets); nothing is downloaded")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise WeightsError(f"cannot read {str(path)!r} as a PyTorch weights file: {type(e).__name__}: "
                           f"{str(e)[:200]}") from e
    if not isinstance(state, dict):
        raise WeightsError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__})")
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
    net = FIDInception()
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise WeightsError(f"{str(path)!r} is not the FID Inception-v3 ({WEIGHTS_NAME}): {len(missing)} missing keys "
                           f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, shape mismatches "
                           f"{wrong[:3]}")
    net.load_state_dict(state, strict=False)
    return net.eval().to(device)
