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


# ---------------------------------------------------------------------------------------------------------------
# The page's own checks, without a server: every field by its label, nothing of the server in a message.


@pytest.fixture
def page_checks():
    from types import SimpleNamespace

    from conftest import load_script

    demo_module = load_script("tools/demo.py")
    student = SimpleNamespace(controlled=object())  # a server with a ControlNet branch
    return demo_module, demo_module.Demo(student, None, demo_module.Limits(64, 25, 8, "CPU"))


GOOD = dict(prompt="a large red circle at the center", images=2, seed=0, width=32, height=32, steps=4, guidance=0.0,
            sampler="lcm", control_path=None, control_scale=1.0, compare=False)


@pytest.mark.parametrize("field, value, message", [
    ("prompt", "  ", "Prompt is empty"),
    ("images", None, "Images is empty: enter a whole number from 1 to 8"),
    ("images", 9, "Images must be in 1..8 on this server, got 9"),
    ("seed", None, "Seed is empty"),
    ("seed", -1, "Seed must be in 0.."),
    ("width", None, "Width is empty: enter a whole number from 8 to 64"),
    ("width", 100000, "Width must be in 8..64 pixels on this server, got 100000"),
    ("height", "", "Height is empty"),
    ("steps", None, "Steps is empty"),
    ("steps", 2.7, "Steps must be a whole number from 1 to 25, got 2.7"),
    ("steps", 500, "Steps must be in 1..25 on this server, got 500"),
    ("guidance", None, "Guidance is empty"),
    ("guidance", float("nan"), "Guidance must be a finite number >= 0"),
    ("guidance", -2, "Guidance must be a finite number >= 0"),
    ("control_scale", 1e9, "Control strength must be in 0..2"),
])
def test_each_field_is_checked_by_its_label(page_checks, field, value, message):
    module, demo = page_checks
    with pytest.raises(module.FieldError) as error:
        demo.check(**{**GOOD, field: value})
    assert message in str(error.value)
    assert "sample." not in str(error.value) and "/" not in str(error.value)


def test_a_text_file_named_png_is_refused_cleanly(page_checks, tmp_path):
    module, demo = page_checks
    fake = tmp_path / "edges.png"
    fake.write_text("not an image")
    with pytest.raises(module.FieldError, match="Control map: the uploaded file is not an image") as error:
        demo.check(**{**GOOD, "control_path": str(fake)})
    assert str(tmp_path) not in str(error.value)
    request = demo.check(**GOOD)
    assert (request.steps, request.images, request.control) == (4, 2, None)


def test_pipeline_messages_reach_the_page_with_field_labels_and_no_paths(page_checks):
    module, _ = page_checks
    text = module.page_text("sample.seed must be in 0..9223372036853775804, got -1; see /tmp/gradio/abc/edges.png")
    assert text == "Seed must be in 0..9223372036853775804, got -1; see edges.png"
    assert module.page_text("width/height 32") == "width/height 32"


def test_warnings_name_the_field(page_checks):
    """Words the model never saw, a control map of another size and CFG on the distilled student: said in the page."""
    from types import SimpleNamespace

    from models.text_encoder import TextEncoderConfig, load_text_encoder

    module, demo = page_checks
    encoder = load_text_encoder(TextEncoderConfig(path=str(ROOT / "weights/shapes/t5"), max_tokens=32, dtype="fp32"))
    demo.student = SimpleNamespace(controlled=object(), text_encoder=encoder, distilled=True)
    request = demo.check(**{**GOOD, "prompt": "a cat riding a bicycle", "guidance": 7.0})
    request.control = Image.new("RGB", (512, 512))
    warnings = demo.warnings(request)
    assert any(w.startswith("Prompt: the model never saw bicycle, cat, riding") for w in warnings), warnings
    assert any(w.startswith("Control map: resized from 512x512 to 32x32") for w in warnings), warnings
    assert any(w.startswith("Guidance 7 with the LCM sampler on this distilled student") for w in warnings), warnings
    assert demo.warnings(demo.check(**GOOD)) == []
