"""The gradio demo, served on localhost and driven through its HTTP API (gradio_client) as a user's script would."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port
from PIL import Image

from evaluation.shapes import read_shapes

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")


def start(tmp_path_factory, *extra):
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tools/demo.py"), "--port", str(port), "--max-side", "64",
                                 "--max-steps", "25", *extra], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        client = None
        while client is None:
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the demo did not start:\n{log.read_text()[-3000:]}")
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # not listening yet
                time.sleep(1)
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start(tmp_path_factory)


@pytest.fixture(scope="module")
def controlled_server(tmp_path_factory):
    """The demo (the shipped student) with a ControlNet branch of it (random projections), and an edge image."""
    from models.checkpoint import load_checkpoint
    from models.controlnet import ControlConfig, build_branch, save_branch
    from models.shipped import content_hash

    root = tmp_path_factory.mktemp("branch")
    student = ROOT / "weights" / "shapes" / "student.safetensors"
    base, _, _ = load_checkpoint(student)
    branch = build_branch(base.float(), ControlConfig(num_blocks=2))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in branch.named_parameters():
            if "_proj" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    save_branch(branch, base, root / "branch.safetensors", content_hash(student))
    edges = np.zeros((32, 32, 3), np.uint8)
    edges[8:24, 8] = edges[8:24, 23] = edges[8, 8:24] = edges[23, 8:24] = 255
    Image.fromarray(edges).save(root / "edges.png")
    for client in start(tmp_path_factory, "--control-checkpoint", str(root / "branch.safetensors")):
        yield client, root / "edges.png"


def test_generates_the_prompted_shape(server):
    path = server.predict("a large red circle at the center", "lcm", 4, 0.0, 0, 32, 32, api_name="/generate")
    image = np.asarray(Image.open(Path(path)).convert("RGB"))
    assert image.shape == (32, 32, 3)
    shapes = read_shapes(image)
    assert [s.color for s in shapes] == ["red"] and shapes[0].position == "center"


def test_bad_requests_get_a_message_and_the_server_keeps_serving(server):
    with pytest.raises(Exception, match=r"Width must be in 8\.\.64 pixels on this server, got 100000"):
        server.predict("a small blue square at the top left", "dpm", 20, 3.0, 0, 100000, 32, api_name="/generate")
    with pytest.raises(Exception, match=r"Steps must be in 1\.\.25 on this server, got 500"):
        server.predict("a small blue square at the top left", "dpm", 500, 3.0, 0, 32, 32, api_name="/generate")
    # NaN cannot travel in JSON; a negative guidance reaches the pipeline's own check.
    with pytest.raises(Exception, match=r"Guidance must be a finite number >= 0"):
        server.predict("a small blue square at the top left", "dpm", 20, -2.0, 0, 32, 32, api_name="/generate")
    with pytest.raises(Exception, match="Prompt is empty"):
        server.predict("   ", "dpm", 20, 3.0, 0, 32, 32, api_name="/generate")
    path = server.predict("a small blue square at the top left", "lcm", 4, 0.0, 1, 32, 32, api_name="/generate")
    assert Image.open(Path(path)).size == (32, 32)


def test_control_image_upload(controlled_server):
    """Without an upload the branch is not used (the shipped student's image); with one it steers the image."""
    client, edges = controlled_server
    args = ("a large red square at the center", "lcm", 4, 0.0, 4, 32, 32)
    plain = np.asarray(Image.open(client.predict(*args, None, api_name="/generate")))
    steered = np.asarray(Image.open(client.predict(*args, gradio_client.handle_file(str(edges)),
                                                   api_name="/generate")))
    assert plain.shape == steered.shape == (32, 32, 3) and not np.array_equal(plain, steered)
