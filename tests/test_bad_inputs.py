"""Bad inputs to the entry scripts, one table per script: each must exit with status 2 and an `error: ...` message
that names the problem, before anything heavy loads and without leaving an output or run folder behind.

(More tables live beside their features: tests/test_sample_cli.py, test_train_cli.py, test_controlnet.py,
test_evaluation.py, test_data.py, test_quantize.py.)
"""

import logging
from pathlib import Path

import pytest
import torch
from conftest import load_script, random_model, tiny_config

from common.files import TRAIN_STATE_FORMAT
from models.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sample_main = load_script("sample/sample.py").main
train_main = load_script("train/train.py").main
convert_main = load_script("tools/convert_checkpoint.py").main


def exits_2_with(main, argv, caplog, message) -> None:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusals (invalid choice) exit 2 with usage on stderr
            code = e.code
    assert code == 2
    assert message in caplog.text or message == "(argparse)", caplog.text[-2000:]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "a_file").write_text("not a folder")
    torch.save({"format": TRAIN_STATE_FORMAT, "model": {}}, root / "step_00000100.pt")
    torch.save({"format": TRAIN_STATE_FORMAT, "model": {"branch.x": torch.zeros(1)}, "ema": None, "step": 5,
                "config": {"model": {}}}, root / "cn_step.pt")
    torch.save({"format": TRAIN_STATE_FORMAT, "model": {"x_embedder.proj.weight": torch.zeros(1)}, "ema": None,
                "step": 5, "config": {"model": {}}}, root / "noema_step.pt")
    cfg = tiny_config()
    save_checkpoint(random_model(cfg).state_dict(), cfg, root / "tiny.safetensors", "safetensors")
    return root


SAMPLE_CASES = [
    (["--width", "0", "--height", "0"], "must be a positive number of pixels, got 0"),
    (["--width", "-64"], "must be a positive number of pixels, got -64"),
    (["--width", "100000", "--height", "100000"], "more than sample.max_pixels"),
    (["--width", "512", "--aspect-ratio", "16:9"], "pass either --width/--height or --aspect-ratio, not both"),
    (["--device", "tpu9"], "unknown device 'tpu9'"),
    (["--guidance", "nan"], "sample.guidance must be a finite number"),
    (["--guidance", "-1"], "sample.guidance must be a finite number >= 0"),
    (["--steps", "0"], "LCM steps must be an integer in 1..50"),
    (["--seed", str(2**63)], "sample.seed must be in"),
    (["--checkpoint", "{root}/step_00000100.pt"], "is a training checkpoint"),
    (["--checkpoint", "{root}/missing.safetensors"], "does not exist"),
    (["--out", "{root}/a_file"], "is a file, not a folder"),
    (["--prompts-file", "{root}/missing.txt"], "does not exist"),
    (["--control", "{root}/missing.png"], "missing.png"),
    (["--set", "sample.quantize=int4"], "sample.quantize must be one of none, int8, fp8, got 'int4'"),
    (["--quantize", "int4"], "(argparse)"),
    (["--set", "sample.stepz=3"], "did you mean 'sample.steps'"),
    (["--control", "docs/examples/triangle_edges.png", "--control-scale", "1e9"], "must be a number in 0..2"),
    (["--control", "docs/examples/triangle_edges.png", "--control-scale", "-1"], "must be a number in 0..2"),
    (["--control", "docs/examples/triangle_edges.png", "--control-scale", "nan"], "must be a number in 0..2"),
]
if not torch.cuda.is_available():
    SAMPLE_CASES.append((["--device", "cuda"], "this machine has no CUDA GPU"))


@pytest.mark.parametrize("args, message", SAMPLE_CASES, ids=[" ".join(a) for a, _ in SAMPLE_CASES])
def test_sample(files, tmp_path, caplog, args, message):
    args = [a.format(root=files) for a in args]
    prompt = [] if "--prompts-file" in args else ["--prompt", "a large red circle at the center"]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    exits_2_with(sample_main, [*prompt, *out, "--no-progress", *args], caplog, message)
    assert not (tmp_path / "out").exists()


TRAIN_CASES = [
    (["--set", "train.steps=0"], "train.steps must be"),
    (["--set", "train.steps=-5"], "train.steps must be"),
    (["--set", "train.runs_dir={root}/a_file"], "a_file"),
    (["--resume", "{root}/missing-run"], "no such run folder"),
    (["--resume", "{root}/tiny.safetensors"], "not a training checkpoint"),
    (["--set", "train.batch_size=0"], "train.batch_size"),
    (["--set", "train.lr=nan"], "train.lr"),
    (["--set", "train.timestep_logit_normal=[0, 0]"], "train.timestep_logit_normal must be [mean, std]"),
    (["--set", "train.timestep_power=2", "--set", "train.timestep_logit_normal=[-0.2, 0.8]"], "set one of them"),
    (["--set", "train.loss_edge_weight=-1"], "train.loss_edge_weight must be a finite number >= 0"),
    (["--set", "autoencoder.kind=sd-vae", "--set", "train.loss_edge_weight=4"], "needs a pixel-space model"),
    (["--config", "no_such_preset"], "no_such_preset"),
]


@pytest.mark.parametrize("args, message", TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_train(files, tmp_path, caplog, args, message):
    args = [a.format(root=files) for a in args]
    config = [] if "--config" in args or "--resume" in args else ["--config", "shapes_teacher"]
    runs = [] if any("runs_dir" in a for a in args) else ["--set", f"train.runs_dir={tmp_path / 'runs'}"]
    exits_2_with(train_main, [*config, *runs, *args], caplog, message)
    assert not (tmp_path / "runs").exists()


CONVERT_CASES = [
    (["{root}/tiny.safetensors", "{out}/x.safetensors", "--to", "official"], "name it e.g. x.pth"),
    (["{root}/tiny.safetensors", "{out}/x.pth", "--to", "safetensors"], "name it e.g. x.safetensors"),
    (["{root}/missing.pth", "{out}/x.safetensors", "--to", "safetensors"], "does not exist"),
    (["{root}/a_file", "{out}/x.safetensors", "--to", "safetensors"], "cannot read"),
    (["{root}/step_00000100.pt", "{out}/x.safetensors", "--to", "safetensors"], "training checkpoint without"),
    (["{root}/cn_step.pt", "{out}/x.safetensors", "--to", "safetensors"], "training state of a ControlNet branch"),
    (["{root}/noema_step.pt", "{out}/x.safetensors", "--to", "safetensors"], "export --weights model"),
    (["{root}/tiny.safetensors", "{out}/x.pth", "--to", "official", "--quantize", "int8"], "pass --to safetensors"),
]


@pytest.mark.parametrize("args, message", CONVERT_CASES, ids=[" ".join(a) for a, _ in CONVERT_CASES])
def test_convert(files, tmp_path, caplog, args, message):
    out = tmp_path / "out"
    out.mkdir()
    exits_2_with(convert_main, [a.format(root=files, out=out) for a in args], caplog, message)
    assert not list(out.iterdir())


def test_convert_overwrite_of_a_diffusers_folder(files, tmp_path, caplog):
    """An existing diffusers transformer/ folder is kept without --overwrite and replaced with it."""
    src, dst = str(files / "tiny.safetensors"), tmp_path / "hf"
    assert convert_main([src, str(dst), "--to", "diffusers"]) == 0
    marker = dst / "transformer" / "marker.txt"
    marker.write_text("old")
    exits_2_with(convert_main, [src, str(dst), "--to", "diffusers"], caplog, "pass --overwrite")
    assert marker.exists()
    assert convert_main([src, str(dst), "--to", "diffusers", "--overwrite"]) == 0
    assert not marker.exists() and (dst / "transformer" / "config.json").is_file()


def test_nan_latents_stop_naming_the_step(tmp_path, caplog):
    """Weights that make NaN (here one NaN bias of the final layer) stop the sampler at the first step, named."""
    from models.checkpoint import load_checkpoint, read_checkpoint

    student = ROOT / "weights" / "shapes" / "student.safetensors"
    model, cfg, _ = load_checkpoint(student)
    with torch.no_grad():
        model.final_layer.linear.bias[0] = float("nan")
    broken = save_checkpoint(model.state_dict(), cfg, tmp_path / "nan.safetensors", "safetensors",
                             metadata={"config": read_checkpoint(student).metadata["config"]})
    exits_2_with(sample_main, ["--prompt", "a large red circle at the center", "--checkpoint", str(broken),
                               "--out", str(tmp_path / "out"), "--no-progress"], caplog,
                 "the latents became NaN/inf at step 1 of 4")
    assert not list((tmp_path / "out").glob("*/*.png"))


def test_written_files_honour_the_umask(tmp_path):
    """Atomic writes go through temporary files (0600 by default); the results get the permissions of a plain new
    file and folder (0666 / 0777 less the umask), read off ones made here without touching the umask."""
    cfg = tiny_config()
    path = save_checkpoint(random_model(cfg).state_dict(), cfg, tmp_path / "w.safetensors", "safetensors")
    folder = save_checkpoint(random_model(cfg).state_dict(), cfg, tmp_path / "hf", "diffusers")
    (tmp_path / "plain.txt").write_text("")
    (tmp_path / "plain").mkdir()
    file_mode, dir_mode = ((tmp_path / p).stat().st_mode & 0o777 for p in ("plain.txt", "plain"))
    assert file_mode != 0o600  # (a umask of 077 would make this test unable to tell the difference)
    assert path.stat().st_mode & 0o777 == file_mode
    assert (folder / "transformer").stat().st_mode & 0o777 == dir_mode
    assert all(p.stat().st_mode & 0o777 == file_mode for p in (folder / "transformer").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# The trainers' feature cache: missing, or extracted for another image size (README's ControlNet extraction once
# lacked --base-size 32 and cached the 32x32 shapes at 256x256: killed for memory, or training 200x slower).

TRAINERS = {"train.py": "shapes_teacher", "train_lcm.py": "lcm_shapes", "train_controlnet.py": "controlnet_shapes"}


@pytest.fixture(scope="module")
def cache_at_64(tmp_path_factory):
    """A feature cache of shapes images (with edge maps) extracted at 64x64 for the 32x32 shapes models."""
    from data.synthetic import write_dataset
    from tools.extract_features import main as extract

    root = tmp_path_factory.mktemp("cache64")
    write_dataset(root / "data", 4, seed=0, sizes=((32, 32),), progress=False)
    assert extract([str(root / "data"), str(root / "cache"), "--config", "shapes_teacher", "--base-size", "64",
                    "--control", "edge", "--no-progress"]) == 0
    return root / "cache"


@pytest.mark.parametrize("script", TRAINERS)
def test_a_missing_cache_leaves_no_run_folder(script, tmp_path, caplog):
    main = load_script(f"train/{script}").main
    exits_2_with(main, ["--config", TRAINERS[script], "--set", f"data.cache_dir={tmp_path / 'nonexistent'}",
                        "--set", f"train.runs_dir={tmp_path / 'runs'}"], caplog, "--base-size SIDE")
    assert "does not exist" in caplog.text
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", TRAINERS)
def test_a_cache_of_another_image_size_is_refused(script, cache_at_64, tmp_path, caplog):
    main = load_script(f"train/{script}").main
    exits_2_with(main, ["--config", TRAINERS[script], "--set", f"data.cache_dir={cache_at_64}",
                        "--set", f"train.runs_dir={tmp_path / 'runs'}"], caplog,
                 "holds 64x64 images (64x64 latents), but the model is made for 32x32")
    assert "--base-size 32" in caplog.text
    assert not (tmp_path / "runs").exists()


def test_convert_to_pipeline_refuses_a_vae_of_other_latent_channels(tmp_path, tiny_t5_path, tiny_vae_path, caplog):
    """A 4-channel VAE around an 8-channel transformer once made a pipeline that diffusers failed to run."""
    cfg = tiny_config(in_channels=8)
    src = save_checkpoint(random_model(cfg).state_dict(), cfg, tmp_path / "c8.safetensors", "safetensors")
    exits_2_with(convert_main, [str(src), str(tmp_path / "pipe"), "--to", "pipeline", "--text-encoder",
                                str(tiny_t5_path), "--vae", str(tiny_vae_path)], caplog,
                 "makes 4-channel latents but the transformer")
    assert not (tmp_path / "pipe").exists()


def test_convert_to_pipeline_says_a_pixel_space_model_cannot_be_one(tmp_path, tiny_t5_path, tiny_vae_path, caplog):
    student = ROOT / "weights" / "shapes" / "student.safetensors"
    exits_2_with(convert_main, [str(student), str(tmp_path / "pipe"), "--to", "pipeline", "--text-encoder",
                                str(ROOT / "weights" / "shapes" / "t5"), "--vae", str(tiny_vae_path)], caplog,
                 "is a pixel-space model")
    assert "--to diffusers" in caplog.text and not (tmp_path / "pipe").exists()


def test_a_lora_rank_above_the_layer_width_is_refused_before_loading(tmp_path, caplog):
    lcm_main = load_script("train/train_lcm.py").main
    exits_2_with(lcm_main, ["--config", "lcm_shapes", "--set", "distill.lora_rank=100000", "--set",
                            f"train.runs_dir={tmp_path / 'runs'}"], caplog,
                 "distill.lora_rank=100000 is above the width of the layers it adapts (192")
    assert not (tmp_path / "runs").exists()


def test_guidance_on_a_distilled_student_with_lcm_warns(tmp_path, caplog):
    """The shipped student has its teacher's guidance distilled in: CFG 7 on top degrades it, and says so."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert sample_main(["--prompt", "a large red circle at the center", "--sampler", "lcm", "--guidance", "7",
                            "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "guidance 7 with the LCM sampler on a distilled student" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert sample_main(["--prompt", "a large red circle at the center", "--out", str(tmp_path / "out"),
                            "--no-progress"]) == 0
    assert "distilled student" not in caplog.text


def test_extract_features_lists_folders_and_links_named_like_images(tmp_path):
    """A folder, a looping and a broken symbolic link named like images were skipped silently: report.json lists
    each with its reason, and the real image is extracted."""
    import json

    from PIL import Image

    from tools.extract_features import main as extract

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), "red").save(data / "good.png")
    (data / "folder.png").mkdir()
    (data / "loop.png").symlink_to(data / "loop.png")
    (data / "broken.png").symlink_to(data / "missing-target.png")
    for name in ("good", "folder", "loop", "broken"):
        (data / f"{name}.txt").write_text("a large red circle at the center")
    assert extract([str(data), str(tmp_path / "cache"), "--config", "shapes_teacher", "--base-size", "32",
                    "--no-progress"]) == 0
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    reasons = {s["key"]: s["reason"] for s in report["skipped"]}
    assert "folder named like an image" in reasons["folder"]
    assert "loops back on itself" in reasons["loop"]
    assert "points to nothing" in reasons["broken"]
    assert report["indexed"] == 1
