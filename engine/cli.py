"""The command line every trainer shares: config, overrides, resume, checks before anything loads, exit codes.

    python train/XXX.py --config CONFIG [--set key=value ...]
    python train/XXX.py --resume RUN_DIR_OR_CHECKPOINT [--set train.steps=N]

Exit codes: 0 done; 2 a user error (config, file, input; `error: ...` names it and the fix); 3 training stopped
on a NaN/inf loss; 128 + signal after Ctrl-C / SIGTERM (a resumable checkpoint was saved). Anything else is a bug
and keeps its traceback.
"""

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("train")

CONFIG_KEYS_HINT = ("config keys: --config NAME --print-config prints every section and key with its resolved value; "
                    "each key is explained beside its dataclass field (configs/schema.py lists the sections); "
                    "configs/*.yaml are the presets")


def resume_config_path(resume: str) -> Path:
    """The config.yaml of the run a --resume target belongs to, with an error that says what is wrong."""
    from engine.state import ResumeError, resolve_resume

    run_dir, _ = resolve_resume(resume)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ResumeError(f"--resume {resume}: {run_dir} has no config.yaml, so it is not a run folder of this "
                          f"project (a run folder holds config.yaml, checkpoints/ and log.txt); pass --config too "
                          f"to resume it with an explicit config")
    return config


def check_train_config(cfg) -> None:
    """Values of the train: section that would fail late or silently."""
    from configs.loader import ConfigError

    tc = cfg.train
    positive = {"train.steps": tc.steps, "train.batch_size": tc.batch_size,
                "train.grad_accumulation": tc.grad_accumulation, "train.log_every": tc.log_every,
                "train.checkpoint_every": tc.checkpoint_every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    finite = {"train.lr": tc.lr, "train.weight_decay": tc.weight_decay, "train.grad_clip": tc.grad_clip,
              "train.ema_decay": tc.ema_decay, "train.class_dropout_prob": tc.class_dropout_prob}
    for key, value in finite.items():
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    if tc.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {tc.lr}")
    if tc.sample_every < 0 or tc.warmup_steps < 0:
        raise ConfigError(f"train.sample_every and train.warmup_steps must be >= 0, got {tc.sample_every} and "
                          f"{tc.warmup_steps}")
    if not 0.0 <= tc.class_dropout_prob <= 1.0:
        raise ConfigError(f"train.class_dropout_prob must be in [0, 1], got {tc.class_dropout_prob}")
    from engine.precision import frozen_dtype

    frozen_dtype(tc.frozen_dtype)  # a UserError naming the valid values
    runs = Path(tc.runs_dir)
    if runs.exists() and not runs.is_dir():
        raise ConfigError(f"train.runs_dir {runs} is a file; point it at a folder (run folders are made inside)")


def check_resume_networks(resume: str, make_task, cfg) -> None:
    """A run resumes only with the trainer (and the config) that wrote it: the checkpoint's trained networks must be
    the ones the task trains for this config."""
    from engine.state import ResumeError, checkpoint_networks, resolve_resume

    _, ckpt = resolve_resume(resume)
    names = getattr(make_task, "trained_network_names", None)
    saved, declared = checkpoint_networks(ckpt), list(names(cfg) if names else ("model",))
    if saved != declared:
        raise ResumeError(f"--resume {resume}: the run trained the networks {saved}, but this trainer "
                          f"({make_task.__name__}) with this config trains "
                          f"{declared}: resume it with the trainer and config that started it (train.py, train_lcm.py "
                          f"and train_controlnet.py train one network, 'model'; train_dmd.py trains 'fake_score' and "
                          f"'generator', or the 'generator' alone when dmd.distribution_weight and dmd.gan_weight "
                          f"are 0)")


def run_trainer(make_task: Callable, description: str, argv=None, check: Callable | None = None) -> int:
    """Parse the trainer command line, check everything, train; returns the exit code."""
    from common.errors import UserError
    from configs import Config, add_config_arguments, load_config, to_yaml
    from engine.loop import Interrupted, TrainingError, train

    parser = argparse.ArgumentParser(description=description, epilog=CONFIG_KEYS_HINT,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--resume", help="a run folder (its latest checkpoint) or a checkpoints/step_*.pt file; "
                                         "the run's own config.yaml is used unless --config is given")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    try:
        config = args.config
        if args.resume and not config:  # a resumed run keeps its own config unless another is given
            config = resume_config_path(args.resume)
        if not config:
            raise UserError("no config: pass --config NAME (a preset in configs/ or a YAML file), or --resume RUN")
        cfg = load_config(Config, config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        if args.resume:
            check_resume_networks(args.resume, make_task, cfg)
        check_train_config(cfg)
        if check is not None:
            check(cfg)
        train(cfg, make_task, resume=args.resume)
    except Interrupted as e:
        log.warning("%s", e)
        return 128 + e.signum
    except TrainingError as e:
        log.error("error: %s", e)
        return 3
    except UserError as e:
        log.error("error: %s", e)
        return 2
    return 0
