"""Shipped weights: the manifest check before loading (missing or changed files), the shapes text encoder's
tokenizer and its warning for words it never saw."""

import json
import logging
from pathlib import Path

import pytest
import torch

from data.synthetic import SceneSpec, caption, scene_at
from models.checkpoint import CheckpointError, save_checkpoint
from models.shipped import MANIFEST_NAME, ShippedWeightsError, verify_shipped, write_manifest
from models.text_encoder import TextEncoderConfig, TextEncoderError, load_text_encoder
from tests.conftest import random_model, tiny_config
from tools.random_weights import main as random_weights_main


@pytest.fixture
def shipped(tmp_path):
    """A weights folder like weights/shapes: a checkpoint and a T5 folder listed in MANIFEST.json."""
    root = tmp_path / "weights" / "shapes"
    cfg = tiny_config(caption_channels=16)
    save_checkpoint(random_model(cfg).state_dict(), cfg, root / "teacher.safetensors", "safetensors")
    data = tmp_path / "data"
    data.mkdir()
    captions = [caption(scene_at(0, i, [(32, 32)], SceneSpec())[2]) for i in range(400)]
    (data / "metadata.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "caption": c}) + "\n"
                                                 for i, c in enumerate(captions)))
    assert random_weights_main(["t5", str(root / "t5"), "--d-model", "16",
                                "--vocab-size", "400", "--corpus", str(data)]) == 0
    files = sorted(p.relative_to(root).as_posix() for p in (root / "t5").rglob("*") if p.is_file())
    write_manifest(root, {"teacher": {"files": ["teacher.safetensors"], "command": "python make_it.py"},
                          "t5": {"files": files, "command": "python make_it.py"}})
    return root


def test_intact_files_load(shipped):
    from models.checkpoint import load_checkpoint

    verify_shipped(shipped / "teacher.safetensors")
    load_checkpoint(shipped / "teacher.safetensors")
    load_text_encoder(TextEncoderConfig(path=str(shipped / "t5"), max_tokens=16, dtype="fp32"))


def test_missing_file_says_clone_without_weights(shipped):
    from models.checkpoint import load_checkpoint

    (shipped / "teacher.safetensors").unlink()
    missing = "teacher.safetensors is missing.*clone without the weights.*git checkout"
    with pytest.raises(CheckpointError, match=missing):
        load_checkpoint(shipped / "teacher.safetensors")


def test_changed_file_names_the_recipe(shipped):
    model = shipped / "t5" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(TextEncoderError, match="model.safetensors differs from the one recorded.*python make_it.py"):
        load_text_encoder(TextEncoderConfig(path=str(shipped / "t5"), max_tokens=16, dtype="fp32"))
    with pytest.raises(ShippedWeightsError, match="differs"):
        verify_shipped(shipped)


def test_files_outside_a_manifest_are_not_checked(tmp_path):
    verify_shipped(tmp_path / "anything.safetensors")  # no manifest anywhere above: nothing to check
    (tmp_path / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ShippedWeightsError, match="not a shipped-weights manifest"):
        verify_shipped(tmp_path / "x.safetensors")


def test_corpus_tokenizer_has_one_piece_per_caption_word_and_warns_on_unseen(shipped, caplog):
    encoder = load_text_encoder(TextEncoderConfig(path=str(shipped / "t5"), max_tokens=16, dtype="fp32"))
    pieces = encoder.tokenizer.tokenize("a small red circle at the top left")
    assert pieces == ["▁a", "▁small", "▁red", "▁circle", "▁at", "▁the", "▁top", "▁left"]
    with caplog.at_level(logging.WARNING):
        features, _ = encoder.encode(["a small red circle at the top left", "a small zebra at the top"])
    assert torch.isfinite(features).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'a small zebra at the top'" in warnings[0] and ": zebra (" in warnings[0]


def test_the_readme_generation_command_draws_the_prompt(tmp_path):
    """The README's second command, as written (the default preset: the shipped student, LCM 4 steps, offline)."""
    import numpy as np
    from conftest import load_script
    from PIL import Image

    from evaluation.shapes import read_shapes

    main = load_script("sample/sample.py").main
    assert main(["--prompt", "a large red circle at the center", "--out", str(tmp_path), "--no-progress"]) == 0
    (image,) = tmp_path.glob("*/*.png")
    shapes = read_shapes(np.asarray(Image.open(image).convert("RGB")))
    assert Image.open(image).text["sampler"] == "lcm" and Image.open(image).text["steps"] == "4"
    assert [(s.color, s.position) for s in shapes] == [("red", "center")]


def test_the_readme_controlled_generation_command(tmp_path):
    """PixArt-delta's controlled 4-step generation from the README: the shipped student steered by the shipped
    ControlNet branch through an example edge map; the edge map is saved beside the image."""
    import numpy as np
    from conftest import ROOT, load_script
    from PIL import Image

    from evaluation.edges import control_edges, edge_scores, image_edges
    from evaluation.shapes import read_shapes

    main = load_script("sample/sample.py").main
    edges = ROOT / "docs" / "examples" / "triangle_edges.png"
    assert main(["--prompt", "a large blue triangle at the center", "--control", str(edges), "--out", str(tmp_path),
                 "--no-progress"]) == 0
    (run,) = tmp_path.iterdir()
    image = np.asarray(Image.open(run / "0000_seed0.png").convert("RGB"))
    assert (run / "control.png").is_file()
    assert [(s.color, s.position) for s in read_shapes(image)] == [("blue", "center")]
    f1 = edge_scores(image_edges(image), control_edges(np.asarray(Image.open(edges).convert("RGB"))))[2]
    assert f1 > 0.5, f1  # it follows the map's outline (the base alone draws a round blob)


def test_teacher_recipe_runs_stage_two_from_the_fp16_base_of_stage_one(tmp_path, caplog):
    """The recipe's commands, in order: stage one, then stage two started from the shipped-format base file
    (so the shipped teacher is reproducible from the printed commands); a present base skips stage one."""
    from train.shapes_recipe import main as recipe_main

    def dry_run() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="shapes_recipe"):
            assert recipe_main(["teacher", "--dry-run", "--work", str(work), "--ship", str(ship)]) == 0
        return [r.getMessage()[2:] for r in caplog.records if r.getMessage().startswith("$ ")]

    work, ship = tmp_path / "work", tmp_path / "ship"
    commands = dry_run()
    trains = [c for c in commands if "train/train.py" in c]
    assert [c.split("--config ")[1].split()[0] for c in trains] == ["shapes_teacher", "shapes_teacher_refine"]
    assert f"train.init_from={work / 'teacher-base.safetensors'}" in trains[1]
    assert commands.index(trains[1]) < next(i for i, c in enumerate(commands) if "tools/evaluate.py" in c)

    work.mkdir()
    (work / "teacher-base.safetensors").write_bytes(b"")
    trains = [c for c in dry_run() if "train/train.py" in c]
    assert len(trains) == 1 and "shapes_teacher_refine" in trains[0]


def test_dmd_recipe_trains_one_step_then_two_steps_from_the_student_then_evaluates_both(tmp_path, caplog):
    """`shapes_recipe.py dmd`: the teacher's noise-image pairs; the DMD trainer with the one-step preset on the shipped
    teacher (the generator from the shipped LCD student, the regression term on those pairs); the two-step preset
    from that run's generator kept in fp16; then the shipped generator (dmd_student.safetensors) evaluated with both
    presets' sampling (LCM, two steps and one)."""
    from train.shapes_recipe import main as recipe_main

    work, ship = tmp_path / "work", tmp_path / "ship"
    with caplog.at_level(logging.INFO, logger="shapes_recipe"):
        assert recipe_main(["dmd", "--dry-run", "--work", str(work), "--ship", str(ship)]) == 0
    commands = [r.getMessage()[2:] for r in caplog.records if r.getMessage().startswith("$ ")]
    assert len(commands) == 5 and "tools/make_ode_pairs.py" in commands[0]
    assert f"sample.checkpoint={ship / 'teacher.safetensors'}" in commands[0]
    pairs = commands[0].split()[2]
    for command in commands[1:3]:
        assert f"dmd.teacher={ship / 'teacher.safetensors'}" in command and f"dmd.pairs={pairs}" in command
    assert "train/train_dmd.py --config dmd_shapes " in commands[1]
    assert f"dmd.generator_init={ship / 'student.safetensors'}" in commands[1]
    assert "train/train_dmd.py --config dmd_shapes_2step " in commands[2]
    assert f"dmd.generator_init={work / 'dmd-1step.safetensors'}" in commands[2]
    assert "tools/evaluate.py model --config dmd_shapes_2step " in commands[3]
    assert "tools/evaluate.py model --config dmd_shapes " in commands[4]
    for command in commands[3:]:
        assert f"sample.checkpoint={ship / 'dmd_student.safetensors'}" in command


def test_dmd_recipe_skips_the_one_step_stage_when_its_generator_is_kept(tmp_path, caplog):
    from train.shapes_recipe import main as recipe_main

    work, ship = tmp_path / "work", tmp_path / "ship"
    work.mkdir()
    (work / "pairs.safetensors").write_bytes(b"")
    (work / "dmd-1step.safetensors").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="shapes_recipe"):
        assert recipe_main(["dmd", "--dry-run", "--work", str(work), "--ship", str(ship)]) == 0
    trains = [r.getMessage() for r in caplog.records if "train/train_dmd.py" in r.getMessage()]
    assert len(trains) == 1 and "--config dmd_shapes_2step " in trains[0]


def test_dmd4_recipe_regression_then_dmd_then_on_policy_rows_then_the_mean_of_four_checkpoints(tmp_path, caplog):
    """`shapes_recipe.py dmd4`: the teacher's pairs, the rows re-noised to 639, 339, 119 added to them, stage one
    (regression alone) from the shipped LCD student, stage two from stage one's kept EMA, on-policy rows from stage
    two's kept student, stage three from stage two's kept EMA on them, the mean of stage three's EMA at steps
    100-400 (its training checkpoints), then the shipped dmd4_student.safetensors evaluated with the four-step preset;
    kept generators and pairs skip their stages."""
    from train.shapes_recipe import main as recipe_main

    work, ship = tmp_path / "work", tmp_path / "ship"

    def dry_run() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="shapes_recipe"):
            assert recipe_main(["dmd4", "--dry-run", "--work", str(work), "--ship", str(ship)]) == 0
        return [r.getMessage()[2:] for r in caplog.records if r.getMessage().startswith("$ ")]

    commands = dry_run()
    assert len(commands) == 8
    assert "tools/make_ode_pairs.py" in commands[0] and "--start-timesteps 639,339,119" in commands[1]
    assert f"--extend {work / 'pairs.safetensors'}" in commands[1]
    pairs4 = commands[1].split()[2]
    assert "train/train_dmd.py --config dmd_shapes_4step_regression " in commands[2]
    assert f"dmd.generator_init={ship / 'student.safetensors'}" in commands[2]
    assert "train/train_dmd.py --config dmd_shapes_4step " in commands[3]
    assert f"dmd.generator_init={work / 'dmd4-regression.safetensors'}" in commands[3]
    for command in commands[2:4]:
        assert f"dmd.pairs={pairs4}" in command and f"dmd.teacher={ship / 'teacher.safetensors'}" in command
    assert "tools/make_ode_pairs.py" in commands[4]
    assert f"--student {work / 'dmd4-stage2-int8w.safetensors'}" in commands[4]
    assert f"--extend {work / 'pairs.safetensors'}" in commands[4] and "--start-timesteps 639,339,119" in commands[4]
    on_policy = commands[4].split()[2]
    assert "train/train_dmd.py --config dmd_shapes_4step_onpolicy " in commands[5]
    assert f"dmd.generator_init={work / 'dmd4-stage2.safetensors'}" in commands[5] and f"dmd.pairs={on_policy}" in \
        commands[5]
    assert "tools/average_checkpoints.py" in commands[6]
    assert commands[6].split()[2].endswith("averaged.safetensors")
    assert [Path(a).name for a in commands[6].split()[3:7]] == [f"step_00000{n}00.pt" for n in (1, 2, 3, 4)]
    assert commands[6].split()[7:9] == ["--metadata-from", commands[6].split()[2].replace("averaged", "ema")]
    assert "tools/evaluate.py model --config dmd_shapes_4step_onpolicy " in commands[7]
    assert f"sample.checkpoint={ship / 'dmd4_student.safetensors'}" in commands[7]

    work.mkdir()
    for kept in ("pairs.safetensors", "pairs4_639.safetensors", "dmd4-regression.safetensors",
                 "dmd4-stage2-int8w.safetensors"):
        (work / kept).write_bytes(b"")
    trains = [c for c in dry_run() if "train/train_dmd.py" in c or "make_ode_pairs" in c]
    assert len(trains) == 2 and "--student" in trains[0] and "--config dmd_shapes_4step_onpolicy " in trains[1]


def test_int8_weights_shipping_keeps_the_metadata_and_loads_the_fp16_weights_within_half_a_step(tmp_path):
    from models.checkpoint import load_checkpoint, peek
    from models.quantize import block_linears
    from train.shapes_recipe import ship

    cfg = tiny_config(caption_channels=16)
    model = random_model(cfg)
    source = save_checkpoint(model.state_dict(), cfg, tmp_path / "ema.safetensors", "safetensors",
                             metadata={"generator_timesteps": "999,639,339,119"})
    ship(source, tmp_path / "fp16.safetensors")
    ship(source, tmp_path / "int8w.safetensors", storage="int8-weights")
    assert peek(tmp_path / "int8w.safetensors").metadata["generator_timesteps"] == "999,639,339,119"
    half, _, _ = load_checkpoint(tmp_path / "fp16.safetensors")
    stored, _, report = load_checkpoint(tmp_path / "int8w.safetensors")
    assert report.quantization == "int8-weights"
    block = {f"{name}.weight" for name in block_linears(model)}
    for key, value in half.state_dict().items():
        got = stored.state_dict()[key]
        if key in block:
            step = value.float().abs().amax(1, keepdim=True) / 127
            fp16_rounding = value.float().abs() * 2**-11  # the restored weight is fp16 again, as the file's others
            assert ((got.float() - value.float()).abs() <= step / 2 + fp16_rounding).all(), key
        else:
            assert torch.equal(got, value), key
    assert (tmp_path / "int8w.safetensors").stat().st_size < (tmp_path / "fp16.safetensors").stat().st_size


def test_recipe_refuses_a_run_folder_of_its_stage_name_trained_with_another_config(tmp_path, caplog):
    """A finished run named like the stage but trained with other settings (e.g. an ablation left in the runs
    folder) would be shipped as the stage: the recipe stops and names the folder and the keys that differ."""
    from configs import Config, load_config, to_yaml
    from train.shapes_recipe import main as recipe_main

    work, ship = tmp_path / "work", tmp_path / "ship"
    run = work / "runs" / "00000-dmd-shapes-2step"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.txt").write_text("step_00001200.pt")
    other = load_config(Config, "dmd_shapes_2step", ["dmd.regression_steps=first"])
    (run / "config.yaml").write_text(to_yaml(other))
    with pytest.raises(SystemExit, match=r"00000-dmd-shapes-2step has this stage's train.name but another config "
                                         r"\(.*dmd.regression_steps: 'first' -> 'all'"):
        recipe_main(["dmd", "--dry-run", "--work", str(work), "--ship", str(ship)])


def test_the_shipped_weights_fit_the_30_mb_budget():
    from conftest import ROOT

    total = sum(p.stat().st_size for p in (ROOT / "weights").rglob("*") if p.is_file())
    assert total <= 30e6, f"weights/ holds {total / 1e6:.1f} MB, over the 30 MB budget"


@pytest.mark.parametrize("flags, timesteps", [((), [999, 639, 339, 119]), (("--steps", "2"), None),
                                              (("--sampler", "ddim"), None)])
def test_the_default_student_draws_its_own_timesteps_only_at_its_own_step_count(tmp_path, flags, timesteps):
    """The default preset's generator trained at 999, 639, 339, 119: it samples those in 4 LCM steps, and --steps 2
    or another sampler draws that sampler's own timesteps (no error about four timesteps for two steps)."""
    import yaml
    from conftest import load_script

    main = load_script("sample/sample.py").main
    assert main(["--prompt", "a small green triangle at the top right", "--out", str(tmp_path), "--no-progress",
                 *flags]) == 0
    (run,) = tmp_path.iterdir()
    options = yaml.safe_load((run / "config.yaml").read_text())["sample"]["sampler_options"]
    assert options.get("timesteps") == timesteps
