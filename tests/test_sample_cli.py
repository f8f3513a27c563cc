"""sample/sample.py end to end on tiny random weights in the real formats (T5 folder, VAE folder, checkpoints)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script, random_model, tiny_config
from PIL import Image

from models.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
main = load_script("sample/sample.py").main


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tiny_t5_path, tiny_vae_path):
    """Tiny T5 (32-dim), tiny SD-style VAE (4 channels, /8) and a matching MS transformer in two formats."""
    root = tmp_path_factory.mktemp("parts")
    cfg = tiny_config(caption_channels=32, caption_tokens=120, latent_size=8, micro_conditions=True)
    model = random_model(cfg, std=0.05)
    return dict(
        t5=tiny_t5_path,
        vae=tiny_vae_path,
        ckpt=save_checkpoint(model.state_dict(), cfg, root / "tiny.safetensors", "safetensors"),
        diffusers=save_checkpoint({k: v for k, v in model.state_dict().items() if "y_embedding" not in k}, cfg,
                                  root / "hf", "diffusers"),
        three_channel=save_checkpoint(random_model(tiny_config(in_channels=3, caption_tokens=120)).state_dict(),
                                      tiny_config(in_channels=3, caption_tokens=120), root / "rgb.safetensors",
                                      "safetensors"),
    )


def run(parts, tmp_path, *args, checkpoint=None, caplog=None):
    if caplog is not None:
        caplog.clear()
    argv = ["--config", "pixart_alpha_1024", "--checkpoint", str(checkpoint or parts["ckpt"]),
            "--set", f"text_encoder.path={parts['t5']}", "--set", f"autoencoder.path={parts['vae']}",
            "--set", "text_encoder.dtype=fp32", "--out", str(tmp_path / "out"), "--no-progress", *args]
    return main(argv)


def run_dirs(tmp_path):
    return sorted((tmp_path / "out").iterdir())


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_dpm_with_guidance_writes_images_metadata_and_grid(parts, tmp_path):
    code = run(parts, tmp_path, "--prompt", "a red circle", "--prompt", "two blue squares", "--steps", "3",
               "--seed", "11", "--batch-size", "2", "--width", "64", "--height", "64")
    assert code == 0
    (out,) = run_dirs(tmp_path)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000_seed11.png", "0001_seed12.png", "config.yaml", "grid.png", "log.txt", "prompts.txt"]
    image = Image.open(out / "0001_seed12.png")
    assert image.size == (64, 64) and image.mode == "RGB"
    meta = image.text
    assert meta["prompt"] == "two blue squares" and meta["seed"] == "12" and meta["sampler"] == "dpm"
    assert meta["steps"] == "3" and meta["guidance"] == "4.5" and meta["uncond"] == "null"
    assert pixels(out / "0000_seed11.png").std() > 0  # not a constant image
    assert "sampler: dpm" in (out / "config.yaml").read_text()


def test_same_seed_same_images_other_seed_other_images(parts, tmp_path):
    args = ["--prompt", "a green star", "--sampler", "lcm", "--steps", "2", "--guidance", "0"]
    assert run(parts, tmp_path, *args, "--seed", "5") == 0
    assert run(parts, tmp_path, *args, "--seed", "5") == 0
    assert run(parts, tmp_path, *args, "--seed", "6") == 0
    a, b, c = (pixels(next(d.glob("*.png"))) for d in run_dirs(tmp_path))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("sampler,options", [("ddim", "{eta: 1.0}"), ("lcm", "{}"),
                                             ("dpm", "{algorithm_type: sde-dpmsolver++}")])
def test_image_does_not_depend_on_batching(parts, tmp_path, sampler, options):
    # Stochastic samplers draw each image's fresh noise from its own seeded generator.
    args = ["--prompt", "a small circle", "--images-per-prompt", "3", "--steps", "2", "--sampler", sampler,
            "--set", f"sample.sampler_options={options}"]
    assert run(parts, tmp_path, *args, "--batch-size", "1") == 0
    assert run(parts, tmp_path, *args, "--batch-size", "3") == 0
    one, three = run_dirs(tmp_path)
    for name in ("0000_seed0.png", "0002_seed2.png"):
        assert np.abs(pixels(one / name).astype(int) - pixels(three / name).astype(int)).max() <= 1


def test_negative_prompt_binning_and_aspect_ratio(parts, tmp_path):
    code = run(parts, tmp_path, "--prompt", "a wide scene", "--negative-prompt", "blurry", "--steps", "2",
               "--aspect-ratio", "2:1", "--low-memory")
    assert code == 0
    image = Image.open(next(run_dirs(tmp_path)[0].glob("0000_*.png")))
    assert image.size == (91, 45)  # 2:1 at about 64^2 pixels, generated at the closest bin and resized back
    assert image.text["uncond"] == "negative" and image.text["negative_prompt"] == "blurry"
    assert image.text["generated_at"] == "96x48"  # the 1:2 bin at base 64, snapped to multiples of 16


def test_diffusers_checkpoint_needs_negative_prompt_for_guidance(parts, tmp_path, caplog):
    args = ["--prompt", "x", "--steps", "1"]
    assert run(parts, tmp_path, *args, checkpoint=parts["diffusers"], caplog=caplog) == 2
    assert "no learned null caption" in caplog.text and '--negative-prompt ""' in caplog.text
    assert run(parts, tmp_path, *args, "--negative-prompt", "", checkpoint=parts["diffusers"]) == 0


@pytest.mark.parametrize("args,message", [
    (["--steps", "51", "--sampler", "lcm"], "LCM steps must be an integer in 1..50"),
    (["--width", "70", "--set", "sample.resolution_binning=false"],
     "image size 70x64 (width x height) is not a multiple of 16 (autoencoder downsampling 8 x patch 2): nearest "
     "valid widths [64, 80]"),
    (["--set", "sample.sampler_options={order: 3, eta: 1}"], "['eta'] are not options of sampler 'dpm'"),
    (["--set", "sample.uncond=none"], "sample.uncond must be one of null, negative"),
    (["--set", "text_encoder.path=/nonexistent/t5"], "text encoder '/nonexistent/t5': no such folder"),
    (["--set", "autoencoder.path=/nonexistent/vae"], "autoencoder '/nonexistent/vae': no such folder"),
    (["--set", "sample.stepz=3"], "did you mean 'sample.steps'"),
    (["--aspect-ratio", "wide"], "expected W:H"),
])
def test_bad_requests_fail_before_loading(parts, tmp_path, caplog, args, message):
    assert run(parts, tmp_path, "--prompt", "x", *args, caplog=caplog) == 2
    assert message in caplog.text
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_checkpoint_problems_are_named(parts, tmp_path, caplog):
    assert run(parts, tmp_path, "--prompt", "x", checkpoint=tmp_path / "missing.pth", caplog=caplog) == 2
    assert "does not exist" in caplog.text
    assert run(parts, tmp_path, "--prompt", "x", checkpoint=parts["three_channel"], caplog=caplog) == 2
    assert "takes 3-channel latents but the autoencoder" in caplog.text
    assert run(parts, tmp_path, caplog=caplog) == 2
    assert "no prompts" in caplog.text


def test_long_prompt_warns_how_much_was_cut(parts, tmp_path, caplog):
    long_prompt = " ".join(["a red circle next to a blue square"] * 40)
    assert run(parts, tmp_path, "--prompt", long_prompt, "--steps", "1", caplog=caplog) == 0
    assert "caption cut to 120 tokens: dropped" in caplog.text


def test_command_line_help_and_exit_status(parts, tmp_path):
    script = str(ROOT / "sample/sample.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--prompts-file" in out.stdout and "--sampler" in out.stdout
    out = subprocess.run([sys.executable, script, "--prompt", "x", "--checkpoint", str(parts["ckpt"]),
                          "--steps", "60", "--sampler", "lcm"], capture_output=True, text=True)
    assert out.returncode == 2 and "LCM steps must be an integer in 1..50" in out.stdout


def test_ctrl_c_keeps_the_images_made_and_exits_130(tmp_path):
    """Ctrl-C while the teacher draws 64 images in batches of 2: the finished ones stay (with prompts.txt and
    grid.png), the log says how many, the exit status is 130 and no traceback is printed."""
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample/sample.py"), "--config", "shapes_teacher",
                             "--prompt", "a large red circle at the center", "--images-per-prompt", "64",
                             "--batch-size", "2",
                             "--out", str(out), "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not list(out.glob("*/0001_*.png")):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    (run,) = out.iterdir()
    pngs = sorted(run.glob("0*.png"))
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert 2 <= len(pngs) < 64
    assert f"kept the {len(pngs)} of 64 images" in output and "kept the" in (run / "log.txt").read_text()
    assert len((run / "prompts.txt").read_text().splitlines()) == len(pngs) and (run / "grid.png").is_file()


def test_the_main_command_imports_only_what_it_needs(tmp_path):
    """The README's first command once took 4x `import torch` on 2 cores: timm (torchvision, torch._dynamo),
    transformers and diffusers loaded for a 2-layer T5 and a 32x32 pixel-space model. None of them loads now
    (tools/startup_time.py measures the time)."""
    code = ("import sys\n"
            "sys.argv = ['sample.py', '--prompt', 'a large red circle at the center', '--out', sys.argv[1],"
            " '--no-progress']\n"
            "import runpy\n"
            "try:\n"
            "    runpy.run_path('sample/sample.py', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "heavy = ('timm', 'transformers', 'diffusers', 'torchvision', 'torchao', 'torch._dynamo', 'sympy',"
            " 'scipy')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]
    assert len(list(tmp_path.glob("*/0000_seed0.png"))) == 1
