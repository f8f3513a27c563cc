"""The documented chain on real files: synthetic data -> extract_features -> train/train.py -> sample/sample.py."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from data.synthetic import write_dataset
from engine.state import network_state
from tasks.alpha import PixArtAlphaTask
from tools.extract_features import main as extract

ROOT = Path(__file__).resolve().parents[1]
train_main = load_script("train/train.py").main
sample_main = load_script("sample/sample.py").main


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_t5_path):
    root = tmp_path_factory.mktemp("chain")
    write_dataset(root / "shapes", 12, seed=0, sizes=((32, 32), (32, 48)), progress=False)
    sets = ["--set", f"text_encoder.path={tiny_t5_path}", "--set", f"data.cache_dir={root / 'cache'}",
            "--set", "model.caption_channels=32", "--set", "model.depth=2", "--set", "model.hidden_size=48",
            "--set", f"train.runs_dir={root / 'runs'}", "--set", "train.steps=4", "--set", "train.batch_size=4",
            "--set", "train.checkpoint_every=2", "--set", "train.sample_every=4", "--set", "train.log_every=1",
            "--set", "sample.steps=2", "--set", "data.sample_captions=4"]
    code = extract([str(root / "shapes"), str(root / "cache"), "--config", "shapes_tiny", "--base-size", "32",
                    "--no-progress", *sets])
    assert code == 0
    return root, sets


def test_extract_train_sample(chain, caplog):
    root, sets = chain
    assert train_main(["--config", "shapes_tiny", *sets]) == 0
    (run,) = (root / "runs").iterdir()
    assert (run / "samples" / "step_00000004.png").is_file() and (run / "ema.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["step_00000002.pt", "step_00000004.pt"]
    assert "step 4: loss" in (run / "log.txt").read_text()
    code = sample_main(["--config", "shapes_tiny", "--checkpoint", str(run / "ema.safetensors"), *sets,
                        "--prompt", "a large red circle at the center", "--out", str(root / "out"), "--no-progress"])
    assert code == 0
    (image,) = (root / "out").glob("*/*.png")
    assert Image.open(image).size == (32, 32) and np.asarray(Image.open(image)).std() > 0


def test_a_training_checkpoint_exports_the_weights_of_its_step(chain, tmp_path, caplog):
    """tools/convert_checkpoint.py on a step_*.pt gives that step's EMA, equal to what the run exported then."""
    from models.checkpoint import load_checkpoint, read_checkpoint

    convert_main = load_script("tools/convert_checkpoint.py").main
    root, sets = chain
    assert train_main(["--config", "shapes_tiny", *sets, "--set", "train.name=export"]) == 0
    run = next(p for p in (root / "runs").iterdir() if p.name.endswith("export"))
    step4, step2 = run / "checkpoints" / "step_00000004.pt", run / "checkpoints" / "step_00000002.pt"
    assert convert_main([str(step4), str(tmp_path / "ema4.safetensors"), "--to", "safetensors"]) == 0
    exported, ours = read_checkpoint(run / "ema.safetensors"), read_checkpoint(tmp_path / "ema4.safetensors")
    assert exported.state_dict.keys() == ours.state_dict.keys()
    for k, v in exported.state_dict.items():
        assert torch.equal(v, ours.state_dict[k]), k
    assert ours.metadata["step"] == "4" and "prediction" in ours.metadata["config"]
    # the raw weights of step 2 are another model, still loadable with the run's architecture
    assert convert_main([str(step2), str(tmp_path / "raw2.safetensors"), "--to", "safetensors",
                         "--weights", "model"]) == 0
    raw2 = read_checkpoint(tmp_path / "raw2.safetensors").state_dict
    assert any(not torch.equal(raw2[k], v) for k, v in exported.state_dict.items() if v.is_floating_point())
    load_checkpoint(tmp_path / "raw2.safetensors")
    # --weights means nothing for a weights file
    caplog.clear()
    assert convert_main([str(run / "ema.safetensors"), str(tmp_path / "x.safetensors"), "--to", "safetensors",
                         "--weights", "model"]) == 2
    assert "leave --weights out" in caplog.text and not (tmp_path / "x.safetensors").exists()


def test_resume_from_the_command_line(chain):
    root, sets = chain
    assert train_main(["--config", "shapes_tiny", *sets, "--set", "train.steps=2", "--set", "train.name=resume"]) == 0
    run = next(p for p in (root / "runs").iterdir() if p.name.endswith("resume"))
    assert train_main(["--resume", str(run), "--set", "train.steps=4"]) == 0  # the run's own config.yaml
    assert (run / "checkpoints" / "step_00000004.pt").is_file()


@pytest.mark.parametrize("args,message", [
    (["--set", "train.stepz=3"], "did you mean 'train.steps'"),
    (["--set", "data.cache_dir=/nonexistent"], "tools/extract_features.py"),
    (["--resume", "/nonexistent/run"], "no such run folder"),
    (["--resume", "WEIGHTS"], "not a training checkpoint"),
])
def test_bad_training_requests(chain, caplog, args, message):
    root, sets = chain
    if "WEIGHTS" in args:  # a weights file where a training checkpoint belongs
        (root / "weights.safetensors").write_bytes(b"not used")
        args = [str(root / "weights.safetensors") if a == "WEIGHTS" else a for a in args]
    assert train_main(["--config", "shapes_tiny", *sets, *args]) == 2
    assert message in caplog.text


def synthetic_config(root, sets, *more):
    from configs import Config, load_config

    overrides = [v for flag, v in zip(sets[::2], sets[1::2])]
    return load_config(Config, "shapes_tiny", [*overrides, "train.log_every=10", "train.sample_every=0", *more])


def test_a_few_steps_on_the_synthetic_data_lower_the_loss(chain):
    import torch

    from data.features import FeatureDataset, collate
    from engine.loop import feature_data, train
    from engine.randomness import SampleRandomness

    root, sets = chain
    cfg = synthetic_config(root, sets, "train.steps=40", "train.checkpoint_every=40", "train.lr=2e-3",
                           "train.warmup_steps=1", "train.class_dropout_prob=0.0", "train.name=learn")
    task = PixArtAlphaTask(cfg, torch.device("cpu"))
    data = FeatureDataset(cfg.data.cache_dir)
    bucket = max(data.buckets.values(), key=len)
    batch = collate([data[i] for i in bucket])

    def fixed_loss():
        with torch.no_grad():
            return task.loss(task.model.eval(), batch, SampleRandomness(7, 0, batch["index"]))[0].item()

    before = fixed_loss()
    run = train(cfg, PixArtAlphaTask, feature_data)
    task.model.load_state_dict(network_state(torch.load(run / "checkpoints" / "step_00000040.pt",
                                                weights_only=True))["model"])
    assert fixed_loss() < 0.5 * before


def test_fine_tuning_starts_from_the_given_weights(chain):
    import torch

    from engine.loop import feature_data, train
    from models.checkpoint import load_checkpoint

    root, sets = chain
    base = train(synthetic_config(root, sets, "train.steps=2", "train.name=base"),
                 PixArtAlphaTask, feature_data)
    tuned = train(synthetic_config(root, sets, "train.steps=1", "train.lr=0.0", "train.ema_decay=0.0",
                                   f"train.init_from={base / 'ema.safetensors'}", "train.name=tuned"),
                  PixArtAlphaTask, feature_data)
    start = load_checkpoint(base / "ema.safetensors")[0].state_dict()
    end = load_checkpoint(tuned / "weights.safetensors")[0].state_dict()
    assert all(torch.equal(start[k], end[k]) for k in start)

    # Half-precision weights (as shipped) start an fp32 run: the master weights are fp32, the values those of the file.
    from models.checkpoint import save_checkpoint

    cfg = synthetic_config(root, sets).model
    half = save_checkpoint({k: v.half() for k, v in start.items()}, cfg, root / "half.safetensors", "safetensors")
    tuned = train(synthetic_config(root, sets, "train.steps=1", "train.lr=0.0", "train.ema_decay=0.0",
                                   f"train.init_from={half}", "train.name=tuned-half"),
                  PixArtAlphaTask, feature_data)
    end = load_checkpoint(tuned / "weights.safetensors")[0].state_dict()
    assert all(end[k].dtype == torch.float32 and torch.equal(start[k].half().float(), end[k]) for k in start)


@pytest.fixture(scope="module")
def chain_teachers(chain):
    """Teachers for the chain's config (depth 2) and for another architecture (depth 3), as safetensors."""
    from configs import Config, load_config
    from models.checkpoint import save_checkpoint
    from models.pixart import build_pixart

    root, sets = chain
    cfg = load_config(Config, "shapes_tiny", [v for v in sets[1::2]]).model
    paths = {}
    for depth in (2, 3):
        model_cfg = type(cfg)(**{**cfg.__dict__, "depth": depth})
        paths[depth] = root / f"teacher_depth{depth}.safetensors"
        save_checkpoint(build_pixart(model_cfg).state_dict(), model_cfg, paths[depth], "safetensors")
    return paths


@pytest.mark.parametrize("overrides,message", [
    (["distill.teacher=TEACHER3"], "depth"),
    (["distill.teacher=TEACHER2", "distill.lora_rank=4", "distill.guidance_embedding=true"],
     "distill.guidance_embedding with distill.lora_rank > 0"),
    (["distill.teacher=TEACHER2", "distill.guidance_embedding=true", "distill.w_min=9", "distill.w_max=3"],
     "w_min=9.0 > distill.w_max=3.0"),
    (["distill.teacher=TEACHER2", "distill.ddim_steps=30"], "does not divide"),
    (["distill.teacher=TEACHER2", "distill.lora_alpha=8"], "lora_alpha is set on a full-distillation config"),
    (["distill.teacher=/nonexistent/teacher.safetensors"], "/nonexistent/teacher.safetensors"),
])
def test_bad_distillation_requests_stop_before_training(chain, chain_teachers, caplog, tmp_path, overrides, message):
    root, sets = chain
    sets = [v if "train.runs_dir" not in v else f"train.runs_dir={tmp_path / 'runs'}" for v in sets]
    more = [o.replace("TEACHER2", str(chain_teachers[2])).replace("TEACHER3", str(chain_teachers[3]))
            for o in overrides]
    lcm_main = load_script("train/train_lcm.py").main
    assert lcm_main(["--config", "shapes_tiny", *sets, *[a for o in more for a in ("--set", o)]]) == 2
    assert message in caplog.text
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder left
