"""The HED soft-edge network (models/hed.py) on random weights in the ControlNetHED.pth layout, against a forward
written out here with torch.nn.functional over the raw state dict."""

import pytest
import torch
import torch.nn.functional as F

from models.hed import HEDError, hed_edges, load_hed

LAYOUT = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


def random_hed_state(seed=0) -> dict[str, torch.Tensor]:
    """Keys and shapes of ControlNetHED.pth, random values."""
    gen = torch.Generator().manual_seed(seed)
    state = {"norm": torch.rand(1, 3, 1, 1, generator=gen) * 100}
    for i, (c_in, c_out, convs) in enumerate(LAYOUT, start=1):
        for j in range(convs):
            fan_in = (c_in if j == 0 else c_out) * 9
            state[f"block{i}.convs.{j}.weight"] = torch.randn(c_out, c_in if j == 0 else c_out, 3, 3,
                                                              generator=gen) / fan_in**0.5
            state[f"block{i}.convs.{j}.bias"] = torch.randn(c_out, generator=gen) * 0.01
        state[f"block{i}.projection.weight"] = torch.randn(1, c_out, 1, 1, generator=gen) / c_out**0.5
        state[f"block{i}.projection.bias"] = torch.randn(1, generator=gen) * 0.01
    return state


def written_out_hed(state, images):
    h = images * 255.0 - state["norm"]
    sides = []
    for i, (_, _, convs) in enumerate(LAYOUT, start=1):
        if i > 1:
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        for j in range(convs):
            h = F.relu(F.conv2d(h, state[f"block{i}.convs.{j}.weight"], state[f"block{i}.convs.{j}.bias"], padding=1))
        side = F.conv2d(h, state[f"block{i}.projection.weight"], state[f"block{i}.projection.bias"])
        sides.append(F.interpolate(side, size=images.shape[-2:], mode="bilinear", align_corners=False))
    return torch.sigmoid(torch.stack(sides).mean(dim=0))


def test_hed_matches_the_written_out_network(tmp_path):
    state = random_hed_state()
    torch.save(state, tmp_path / "ControlNetHED.pth")
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    ours = hed_edges(load_hed(tmp_path / "ControlNetHED.pth"), images)
    assert ours.shape == (2, 1, 48, 64) and 0 <= ours.min() and ours.max() <= 1
    torch.testing.assert_close(ours, written_out_hed(state, images), rtol=1e-4, atol=1e-5)


def test_hed_file_errors(tmp_path):
    with pytest.raises(HEDError, match="lllyasviel/Annotators"):
        load_hed(tmp_path / "missing.pth")
    state = random_hed_state()
    del state["block5.projection.bias"]
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(HEDError, match=r"not a ControlNetHED weights file: missing \['block5.projection.bias'\]"):
        load_hed(tmp_path / "other.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"garbage")
    with pytest.raises(HEDError, match="cannot read HED weights"):
        load_hed(tmp_path / "corrupt.pth")


def test_make_control_maps_tool(tmp_path):
    import numpy as np
    from PIL import Image

    from data.synthetic import ShapeObject, render
    from tools.make_control_maps import main

    (tmp_path / "in").mkdir()
    square = ShapeObject(kind="square", color="red", size="large", x=0.5, y=0.5)
    render([square], 48, 32).save(tmp_path / "in" / "a.png")
    torch.save(random_hed_state(), tmp_path / "hed.pth")
    assert main([str(tmp_path / "in"), str(tmp_path / "canny"), "--type", "canny"]) == 0
    edges = np.asarray(Image.open(tmp_path / "canny" / "a.png"))
    assert edges.shape == (32, 48, 3) and set(np.unique(edges)) == {0, 255} and (edges > 0).mean() < 0.3
    assert main([str(tmp_path / "in" / "a.png"), str(tmp_path / "hed"), "--type", "hed", "--hed-weights",
                 str(tmp_path / "hed.pth")]) == 0
    assert np.asarray(Image.open(tmp_path / "hed" / "a.png")).shape == (32, 48, 3)
    assert main([str(tmp_path / "in"), str(tmp_path / "x"), "--type", "hed"]) == 2  # no weights: a message
    assert main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
