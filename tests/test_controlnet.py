"""ControlNet-Transformer and ControlNet-UNet branches on a frozen PixArt: exact no-op at initialisation, the
official data flow (written out here independently, from the official ControlPixArtHalf loop), training touches
the branch only, gradient checkpointing, and the checkpoint layouts with their mismatch errors."""

import pytest
import torch
from conftest import random_inputs, random_model, tiny_config

from models.controlnet import (
    ControlConfig,
    ControlError,
    ControlledPixArt,
    build_branch,
    join_official,
    load_branch,
    read_branch,
    save_branch,
)

DEPTH = 4


def base_model(seed=0):
    return random_model(tiny_config(depth=DEPTH), seed).eval()


def randomise_projections(branch, seed=1):
    """Non-zero before/after projections, so the branch's effect (and any wiring bug) shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in branch.named_parameters():
            if "_proj" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return branch


def inputs(seed=1):
    x, t, y, mask, _ = random_inputs(tiny_config(depth=DEPTH), seed=seed)
    control = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 10))
    return x, t, y, mask, control


@pytest.mark.parametrize("design", ["transformer", "unet"])
@pytest.mark.parametrize("n", [1, 2, DEPTH])
def test_a_fresh_branch_leaves_the_base_unchanged(design, n):
    base = base_model()
    x, t, y, mask, control = inputs()
    with torch.no_grad():
        ref = base(x, t, y, mask)
        model = ControlledPixArt(base, build_branch(base, ControlConfig(design=design, num_blocks=n)))
        assert torch.equal(model(x, t, y, mask, control=control), ref)
        assert torch.equal(model(x, t, y, mask), ref)  # no control: the base itself


def official_transformer_forward(base, branch, x, t, y, mask, control, scale=1.0):
    """PixArt-delta's loop as the official ControlPixArtHalf writes it: base block 0, then for index 1..N the copy
    index-1 on (x, c) and base block index on x + skip, then the remaining base blocks."""
    tokens, c = base.embed_image(x), base.embed_image(control)
    cond = base.condition(t, y, mask, grid=(x.shape[-2] // base.patch_size, x.shape[-1] // base.patch_size))
    blocks = [lambda h, b=b: b(h, cond) for b in base.blocks]
    copies = branch.controlnet
    tokens = blocks[0](tokens)
    for index in range(1, len(copies) + 1):
        copy = copies[index - 1]
        if index == 1:
            c = copy.copied_block(tokens + copy.before_proj(c), cond)
        else:
            c = copy.copied_block(c, cond)
        skip = scale * copy.after_proj(c)
        tokens = blocks[index](tokens + skip) if index < len(blocks) else tokens + skip
    for index in range(len(copies) + 1, len(blocks)):
        tokens = blocks[index](tokens)
    out = base.final_layer(tokens, cond.c)
    return base.unpatchify(out, x.shape[-2] // base.patch_size, x.shape[-1] // base.patch_size)


def mirrored_unet_forward(base, branch, x, t, y, mask, control, scale=1.0):
    """The ablation's ControlNet-UNet: copies encode embed(x) + before_proj(c); skip i enters block depth-1-i."""
    tokens, c = base.embed_image(x), base.embed_image(control)
    cond = base.condition(t, y, mask, grid=(x.shape[-2] // base.patch_size, x.shape[-1] // base.patch_size))
    h, skips = tokens + branch.controlnet[0].before_proj(c), []
    for copy in branch.controlnet:
        h = copy.copied_block(h, cond)
        skips.append(scale * copy.after_proj(h))
    enters = {DEPTH - 1 - i: s for i, s in enumerate(skips)}
    for index, block in enumerate(base.blocks):
        tokens = block(tokens + enters[index] if index in enters else tokens, cond)
    out = base.final_layer(tokens, cond.c)
    return base.unpatchify(out, x.shape[-2] // base.patch_size, x.shape[-1] // base.patch_size)


@pytest.mark.parametrize("design,reference", [("transformer", official_transformer_forward),
                                              ("unet", mirrored_unet_forward)])
@pytest.mark.parametrize("n", [1, 3, DEPTH])
def test_data_flow_matches_the_written_out_design(design, reference, n):
    base = base_model()
    branch = randomise_projections(build_branch(base, ControlConfig(design=design, num_blocks=n)))
    model = ControlledPixArt(base, branch).eval()
    x, t, y, mask, control = inputs()
    with torch.no_grad():
        ours = model(x, t, y, mask, control=control, control_scale=0.7)
        theirs = reference(base, branch, x, t, y, mask, control, scale=0.7)
        assert (ours - base(x, t, y, mask)).abs().max() > 1e-2  # the branch matters here
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_scale_zero_is_the_base():
    base = base_model()
    model = ControlledPixArt(base, randomise_projections(build_branch(base, ControlConfig(num_blocks=2)))).eval()
    x, t, y, mask, control = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y, mask, control=control, control_scale=0.0), base(x, t, y, mask),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("design", ["transformer", "unet"])
def test_one_optimiser_step_changes_only_the_branch(design):
    base = base_model()
    model = ControlledPixArt(base, build_branch(base, ControlConfig(design=design, num_blocks=2))).train()
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    branch_before = {k: v.clone() for k, v in model.branch.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.branch.parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x, t, y, mask, control = inputs()
    model(x, t, y, mask, control=control).square().mean().backward()
    opt.step()
    assert all(torch.equal(base_before[k], v) for k, v in base.state_dict().items())
    changed = [k for k, v in model.branch.state_dict().items() if not torch.equal(branch_before[k], v)]
    assert any("after_proj" in k for k in changed)  # zero-init projections get gradients first


@pytest.mark.parametrize("design", ["transformer", "unet"])
def test_gradient_checkpointing_gives_the_same_gradients(design):
    grads = []
    for checkpointing in (False, True):
        base = base_model()
        branch = randomise_projections(build_branch(base, ControlConfig(design=design, num_blocks=3)))
        model = ControlledPixArt(base, branch).train()
        base.gradient_checkpointing = checkpointing
        x, t, y, mask, control = inputs()
        model(x, t, y, mask, control=control).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.branch.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for n, g in grads[0].items() if "copied_block" in n)


def test_official_layout_round_trips(tmp_path):
    base = base_model()
    branch = randomise_projections(build_branch(base, ControlConfig(num_blocks=3)))
    state = join_official(base.state_dict(), branch.state_dict())
    assert "controlnet.0.before_proj.weight" in state and "controlnet.1.before_proj.weight" not in state
    assert "controlnet.2.after_proj.bias" in state and "controlnet.2.copied_block.attn.qkv.weight" in state
    assert "base_model.blocks.3.mlp.fc2.weight" in state
    torch.save(state, tmp_path / "PixArt-tiny-ControlNet.pth")
    branch_state, meta, base_state = read_branch(tmp_path / "PixArt-tiny-ControlNet.pth")
    assert meta["design"] == "transformer" and base_state.keys() == base.state_dict().keys()
    loaded = load_branch(tmp_path / "PixArt-tiny-ControlNet.pth", base, ControlConfig(num_blocks=3))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in branch.state_dict().items())
    save_branch(loaded, base, tmp_path / "branch.safetensors", base_sha256="ab" * 32)
    again = load_branch(tmp_path / "branch.safetensors", base, ControlConfig(num_blocks=3), base_sha256="ab" * 32)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in branch.state_dict().items())


@pytest.mark.parametrize("cfg,base_kw,sha,message", [
    (ControlConfig(num_blocks=2), {}, None, "it has N = 3 copied blocks, the config control.num_blocks = 2"),
    (ControlConfig(design="unet", num_blocks=3), {}, None, "its design is 'transformer'"),
    (ControlConfig(num_blocks=3), {"hidden_size": 96}, None, "its width is 48, the base model's hidden_size is 96"),
    (ControlConfig(num_blocks=3), {}, "cd" * 32, "trained on a base model with sha256 abababababab"),
])
def test_a_branch_that_does_not_fit_is_refused(tmp_path, cfg, base_kw, sha, message):
    base = base_model()
    save_branch(build_branch(base, ControlConfig(num_blocks=3)), base, tmp_path / "b.safetensors", "ab" * 32)
    other = random_model(tiny_config(depth=DEPTH, **base_kw)) if base_kw else base
    with pytest.raises(ControlError, match=message):
        load_branch(tmp_path / "b.safetensors", other, cfg, base_sha256=sha)


def test_bad_configs_and_files(tmp_path):
    base = base_model()
    with pytest.raises(ControlError, match=r"control.num_blocks=5 must be in 1..4"):
        build_branch(base, ControlConfig(num_blocks=DEPTH + 1))
    with pytest.raises(ControlError, match="control.design must be one of transformer, unet"):
        build_branch(base, ControlConfig(design="mlp"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ControlError, match="cannot read control checkpoint"):
        read_branch(tmp_path / "bad.safetensors")
    torch.save(base.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ControlError, match="not an official PixArt ControlNet state dict"):
        read_branch(tmp_path / "plain.pth")
    model = ControlledPixArt(base, build_branch(base, ControlConfig(num_blocks=1)))
    x, t, y, mask, control = inputs()
    with pytest.raises(ValueError, match="must have the shape of the latents"):
        model(x, t, y, mask, control=control[..., :8])


# ----------------------------------------------------------------------------------------------------------
# The trainer (train/train_controlnet.py) on the shared loop

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import free_port, load_script  # noqa: E402
from toy_training import last_state, toy_config, toy_data  # noqa: E402

from engine.loop import train  # noqa: E402
from engine.state import ResumeError  # noqa: E402
from models.checkpoint import save_checkpoint  # noqa: E402

TESTS = Path(__file__).resolve().parent
from tasks.controlnet import ControlNetTask  # noqa: E402


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    """A random base matching the toy config (tests/toy_training.py), as this project's safetensors."""
    cfg = tiny_config(caption_channels=32, caption_tokens=8, latent_size=8)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_checkpoint(random_model(cfg, seed=3, std=0.05).state_dict(), cfg, path, "safetensors")
    return path


def control_config(runs, base, *overrides):
    return toy_config(runs, f"control.base={base}", "control.num_blocks=1", "train.ema_decay=0.9",
                      "train.class_dropout_prob=0.5", *overrides)


@pytest.mark.parametrize("design", ["transformer", "unet"])
def test_training_checkpoints_hold_the_branch_only_and_export_it(toy_base, tmp_path, design):
    run = train(control_config(tmp_path, toy_base, f"control.design={design}"), ControlNetTask, toy_data)
    state = last_state(run)
    assert state["model"] and all(k.startswith("branch.") for k in state["model"])
    assert all(k.startswith("branch.") for k in state["ema"]["shadow"])
    assert state["references"]["base"]["path"] == str(toy_base)
    base, _, _ = load_checkpoint_of(toy_base)
    branch = load_branch(run / "ema.safetensors", base, ControlConfig(design=design, num_blocks=1))
    assert any(v.abs().sum() > 0 for k, v in branch.state_dict().items() if "after_proj" in k)  # it trained


def load_checkpoint_of(path):
    from models.checkpoint import load_checkpoint

    return load_checkpoint(path)


def test_resume_equals_an_uninterrupted_run_and_refuses_another_base(toy_base, tmp_path):
    whole = train(control_config(tmp_path / "whole", toy_base), ControlNetTask, toy_data)
    part = train(control_config(tmp_path / "part", toy_base, "train.steps=3"), ControlNetTask, toy_data)
    resumed = train(control_config(tmp_path / "part", toy_base), ControlNetTask, toy_data, resume=str(part))
    a, b = (last_state(r) for r in (whole, resumed))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    other = tmp_path / "other.safetensors"
    cfg = tiny_config(caption_channels=32, caption_tokens=8, latent_size=8)
    save_checkpoint(random_model(cfg, seed=4, std=0.05).state_dict(), cfg, other, "safetensors")
    with pytest.raises(ResumeError, match="frozen networks it was trained against changed"):
        train(control_config(tmp_path / "part", other, "train.steps=9"), ControlNetTask, toy_data,
              resume=str(part))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_controlnet_equals_one_process(toy_base, tmp_path, strategy):
    common = (f"control.base={toy_base}", "control.num_blocks=1", "train.ema_decay=0", "train.steps=3",
              "train.checkpoint_every=3", f"train.distributed={strategy}")
    one = train(toy_config(tmp_path / "one", "train.batch_size=4", *common), ControlNetTask, toy_data)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), str(TESTS / "toy_train_run.py"), str(tmp_path / "two"), "--task",
                          "controlnet", "train.batch_size=2", *common], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (two,) = (tmp_path / "two").iterdir()
    a, b = (last_state(r) for r in (one, two))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Controlled sampling from sample/sample.py, on the shipped shapes teacher

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = TESTS.parent
TEACHER = ROOT / "weights" / "shapes" / "teacher.safetensors"
sample_main = load_script("sample/sample.py").main


@pytest.fixture(scope="module")
def teacher_branches(tmp_path_factory):
    """A fresh (zero-projection) and a random-projection N=2 branch for the shipped teacher, and an edge image."""
    from models.checkpoint import load_checkpoint
    from models.shipped import content_hash

    root = tmp_path_factory.mktemp("branches")
    base, _, _ = load_checkpoint(TEACHER)
    base = base.float()
    sha = content_hash(TEACHER)
    fresh = build_branch(base, ControlConfig(num_blocks=2))
    save_branch(fresh, base, root / "fresh.safetensors", sha)
    save_branch(randomise_projections(build_branch(base, ControlConfig(num_blocks=2))), base,
                root / "random.safetensors", sha)
    save_branch(fresh, base, root / "other_base.safetensors", "00" * 32)
    save_branch(fresh, base, root / "bigger.safetensors", sha, extra={"num_blocks": "7"})  # claims N = 7 > depth
    edges = np.zeros((32, 32, 3), np.uint8)
    edges[8:24, 8] = edges[8:24, 23] = edges[8, 8:24] = edges[23, 8:24] = 255  # a square outline
    Image.fromarray(edges).save(root / "edges.png")
    Image.fromarray(edges[:, :, 0]).resize((48, 40)).save(root / "edges_gray_48x40.png")
    return root


def generate_with(root, out, *args):
    argv = ["--config", "shapes_teacher", "--prompt", "a large red square at the center", "--steps", "3", "--seed",
            "5", "--out", str(out), "--no-progress", "--control-checkpoint", str(root / "fresh.safetensors"), *args]
    code = sample_main(argv)
    images = sorted(out.glob("*/0000_seed5.png"))
    return code, (np.asarray(Image.open(images[-1])) if images else None)


def test_controlled_sampling_from_the_command_line(teacher_branches, tmp_path, caplog):
    root = teacher_branches
    code, plain = generate_with(root, tmp_path / "plain", "--control-scale", "0")
    assert code == 0
    code, fresh = generate_with(root, tmp_path / "fresh", "--control", str(root / "edges.png"))
    assert code == 0 and np.array_equal(fresh, plain)  # a zero-projection branch changes nothing
    assert (next((tmp_path / "fresh").iterdir()) / "control.png").is_file()
    code, steered = generate_with(root, tmp_path / "random", "--control", str(root / "edges.png"),
                                  "--control-checkpoint", str(root / "random.safetensors"))
    assert code == 0 and not np.array_equal(steered, plain)
    code, resized = generate_with(root, tmp_path / "resized", "--control", str(root / "edges_gray_48x40.png"))
    assert code == 0 and "is 48x40 (WxH) but the image is generated at 32x32: resizing it" in caplog.text


@pytest.mark.parametrize("args,message", [
    (["--control", "EDGES", "--strict-control", "--control", "GRAY"], "drop --strict-control to resize"),
    (["--control", "EDGES", "--control-checkpoint", "OTHER"], "trained on a base model with sha256 000000000000"),
    (["--control", "EDGES", "--control-checkpoint", "BIGGER"], "control.num_blocks=7 must be in 1..6"),
    (["--control", "/nonexistent/edges.png"], "does not exist"),
    (["--control", "EDGES", "--control-checkpoint", "/nonexistent/branch.safetensors"], "does not exist"),
    (["--control", "EDGES", "--control-scale", "-0.5"], "must be a number in 0..2"),
    (["--control", "EDGES", "--control-scale", "nan"], "must be a number in 0..2"),
    (["--control", "EDGES", "--control-scale", "1e6"], "must be a number in 0..2"),
])
def test_bad_control_requests(teacher_branches, tmp_path, caplog, args, message):
    root = teacher_branches
    names = {"EDGES": root / "edges.png", "GRAY": root / "edges_gray_48x40.png",
             "OTHER": root / "other_base.safetensors", "BIGGER": root / "bigger.safetensors"}
    args = [str(names.get(a, a)) for a in args]
    code, _ = generate_with(root, tmp_path / "out", *args)
    assert code == 2 and message in caplog.text


@pytest.mark.parametrize("fill,warning", [
    (0, "carries no edges (0.00% of its pixels are bright)"),       # all black
    (255, "is bright on 100% of its pixels, not an edge map"),       # all white
    ("inverted", "is bright on 9"),                                  # an edge map drawn black on white
    ("edges", None),                                                 # a real edge map: no warning
])
def test_control_maps_without_usable_edges_are_named(caplog, fill, warning):
    from data.control_maps import control_map
    from data.synthetic import ShapeObject, render_edges

    edges = np.asarray(render_edges([ShapeObject("triangle", "red", "large", 0.5, 0.5)], 32, 32))  # (32, 32, 3)
    pixels = {"edges": edges, "inverted": 255 - edges}.get(fill)
    if pixels is None:
        pixels = np.full((32, 32, 3), fill, np.uint8)
    with caplog.at_level("WARNING", logger="data.control_maps"):
        control = control_map(Image.fromarray(pixels), "none", (32, 32), name="--control e.png")
    assert control.shape == (3, 32, 32)
    if warning is None:
        assert not caplog.records
    else:
        assert "--control e.png" in caplog.text and warning in caplog.text


def test_evaluator_scores_controlled_generation(teacher_branches, tmp_path):
    import json

    evaluate = load_script("tools/evaluate.py").main
    root = teacher_branches
    assert evaluate(["model", "--config", "shapes_teacher", "--control", "--set",
                     f"control.checkpoint={root / 'random.safetensors'}", "--set", "evaluation.num_images=6",
                     "--set", "sample.steps=3", "--out", str(tmp_path), "--no-progress"]) == 0
    (run,) = tmp_path.iterdir()
    record = json.loads((run / "results.json").read_text())
    assert record["control_blocks"] == 2 and 0 <= record["edge_f1"] <= 100 and record["real_edge_f1"] > 95


@pytest.mark.slow
def test_ablation_tool_end_to_end(tmp_path):
    """tools/controlnet_ablation.py on a tiny extracted set: trains in resumed segments, evaluates each, writes the
    table, the JSON and the PNG curve; a second call finds everything done."""
    import json

    from data.synthetic import SceneSpec, write_dataset
    from tools.extract_features import main as extract

    write_dataset(tmp_path / "data", 24, seed=0, sizes=((32, 32),), scene=SceneSpec(max_objects=2), progress=False)
    t5 = ROOT / "weights" / "shapes" / "t5"
    assert extract([str(tmp_path / "data"), str(tmp_path / "cache"), "--config", "shapes_teacher", "--base-size", "32",
                    "--control", "edge", "--no-progress", "--set", f"text_encoder.path={t5}"]) == 0
    argv = [sys.executable, str(ROOT / "tools" / "controlnet_ablation.py"), "--work", str(tmp_path / "work"),
            "--variants", "transformer:1", "unet:1", "--steps", "2", "4", "--images", "4", "--batch-size", "4",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "sample.steps=2"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "work" / "ablation.json").read_text())
    assert [(r["design"], r["step"]) for r in result["rows"]] == [("transformer", 0), ("transformer", 2),
                                                                    ("transformer", 4), ("unet", 0), ("unet", 2),
                                                                    ("unet", 4)]
    assert result["rows"][0]["edge_f1"] == result["rows"][3]["edge_f1"]  # step 0 is the base for every design
    assert Image.open(tmp_path / "work" / "edge_f1.png").size == (720, 440)
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "$ " not in again.stdout  # nothing re-run


def test_control_map_extracted_with_hed_on_the_fly(teacher_branches, tmp_path):
    from test_hed import random_hed_state

    root = teacher_branches
    torch.save(random_hed_state(), tmp_path / "ControlNetHED.pth")
    code, _ = generate_with(root, tmp_path / "out", "--control", str(root / "edges.png"), "--control-type", "hed",
                            "--hed-weights", str(tmp_path / "ControlNetHED.pth"))
    assert code == 0
    control = np.asarray(Image.open(next((tmp_path / "out").iterdir()) / "control.png"))
    assert control.shape == (32, 32, 3) and control.std() > 0  # soft edges, not the input copied


def test_converter_splits_and_joins_the_official_controlnet_layout(tmp_path):
    import yaml

    convert = load_script("tools/convert_checkpoint.py").main
    cfg = tiny_config(depth=DEPTH)
    base = base_model()
    branch = randomise_projections(build_branch(base, ControlConfig(num_blocks=3)))
    official = join_official(base.state_dict(), branch.state_dict())
    torch.save(official, tmp_path / "PixArt-tiny-ControlNet.pth")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": cfg.__dict__}))
    assert convert([str(tmp_path / "PixArt-tiny-ControlNet.pth"), str(tmp_path / "split"), "--to", "control",
                    "--config", str(tmp_path / "tiny.yaml")]) == 0
    assert convert([str(tmp_path / "split" / "control.safetensors"), str(tmp_path / "joined.pth"), "--to", "official",
                    "--base", str(tmp_path / "split" / "base.safetensors")]) == 0
    joined = torch.load(tmp_path / "joined.pth", weights_only=True)
    assert joined.keys() == official.keys() and all(torch.equal(joined[k], v) for k, v in official.items())
    # a branch alone cannot become a transformer checkpoint
    assert convert([str(tmp_path / "split" / "control.safetensors"), str(tmp_path / "x.safetensors"), "--to",
                    "safetensors"]) == 2


def test_scale_sweep_tool(teacher_branches, tmp_path):
    """tools/control_scale_sweep.py: a row per scale, the table and the PNG; at scale 0 a trained (here random)
    branch gives exactly what the base gives (a fresh branch at scale 1), so the two rows are equal."""
    import json

    from tools.control_scale_sweep import main as sweep

    common = ["--config", "shapes_teacher", "--images", "4", "--set", "sample.steps=2"]
    assert sweep(["--work", str(tmp_path / "random"), "--branch", str(teacher_branches / "random.safetensors"),
                  "--scales", "0", "1", *common]) == 0
    assert sweep(["--work", str(tmp_path / "fresh"), "--branch", str(teacher_branches / "fresh.safetensors"),
                  "--scales", "1", *common]) == 0
    rows = json.loads((tmp_path / "random" / "shapes_teacher" / "sweep.json").read_text())["rows"]
    (base,) = json.loads((tmp_path / "fresh" / "shapes_teacher" / "sweep.json").read_text())["rows"]
    assert [r["scale"] for r in rows] == [0, 1]
    assert {k: v for k, v in rows[0].items() if k != "scale"} == {k: v for k, v in base.items() if k != "scale"}
    assert rows[1] != rows[0]
    assert Image.open(tmp_path / "random" / "shapes_teacher" / "sweep.png").size == (720, 440)
    with pytest.raises(SystemExit, match="scales must lie in 0..2"):
        sweep(["--work", str(tmp_path / "bad"), "--branch", str(teacher_branches / "random.safetensors"),
               "--scales", "-1"])


def _ablation_rows(design: str, n: int, follows: list[tuple[int, float]]) -> dict:
    fields = ("map_position", "map_kind", "follows_caption", "caption_color", "conflict_edge_f1", "edge_f1",
              "single_kind", "single_all", "multi_all", "fd", "s_per_image")
    return {"rows": [{"design": design, "N": n, "step": s, "follows_map": f, **dict.fromkeys(fields, 1.0)}
                     for s, f in follows]}


def test_ablation_merge_puts_separate_folders_in_one_table_and_plot(tmp_path):
    """--merge reads finished ablation folders (variants trained apart, on different step grids) and writes one
    table, summary and plot; the sudden-convergence step is read on each variant's own grid."""
    import json

    from tools.controlnet_ablation import main

    for name, design, n, curve in (("a", "transformer", 1, [(0, 0.0), (125, 10.0), (250, 60.0), (1000, 90.0)]),
                                   ("b", "unet", 3, [(0, 0.0), (250, 20.0), (500, 80.0), (2000, 90.0)])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ablation.json").write_text(json.dumps(_ablation_rows(design, n, curve)))
    out = tmp_path / "all"
    assert main(["--work", str(out), "--merge", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a")]) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert [(r["design"], r["step"]) for r in result["rows"]] == [
        ("transformer", 0), ("transformer", 125), ("transformer", 250), ("transformer", 1000),
        ("unet", 0), ("unet", 250), ("unet", 500), ("unet", 2000)]
    assert result["summary"]["transformer1"]["convergence_step"] == 250  # 60 >= half of 90; 10 is not
    assert result["summary"]["unet3"]["convergence_step"] == 500 and result["summary"]["unet3"]["final_step"] == 2000
    assert "| unet3 | 2000 | 90.0 |" in (out / "ablation.md").read_text()
    assert Image.open(out / "follows_map.png").size == (720, 440)


def test_ablation_refuses_a_step_its_run_has_passed_and_a_variant_in_two_folders(tmp_path):
    import json

    from tools.controlnet_ablation import main

    checkpoints = tmp_path / "work" / "runs" / "00000-cn-transformer3" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest.txt").write_text("step_00001000.pt")
    with pytest.raises(SystemExit, match=r"trained to step 1000, past the requested step\(s\) \[125\]"):
        main(["--work", str(tmp_path / "work"), "--variants", "transformer:3", "--steps", "125", "2000"])
    assert not (tmp_path / "work" / "branches").exists()  # refused before anything was made
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ablation.json").write_text(json.dumps(_ablation_rows("unet", 3, [(0, 0.0), (250, 5.0)])))
    with pytest.raises(SystemExit, match="variant unet3 is in both"):
        main(["--work", str(tmp_path / "all"), "--merge", str(tmp_path / "a"), str(tmp_path / "b")])
