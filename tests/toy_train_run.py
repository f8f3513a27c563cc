"""Runs the training loop on the toy set in a fresh process (for torchrun and signal tests).

    PYTHONPATH=tests python tests/toy_train_run.py RUNS_DIR [--resume RUN] [--task alpha|lcm|controlnet] [KEY=VALUE]
"""

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from toy_training import toy_config, toy_data

from engine.loop import Interrupted, train

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"alpha": ("train/train.py", "PixArtAlphaTask"), "lcm": ("train/train_lcm.py", "LCMTask"),
         "controlnet": ("train/train_controlnet.py", "ControlNetTask")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs_dir")
    parser.add_argument("--resume")
    parser.add_argument("--task", choices=sorted(TASKS), default="alpha")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    path, name = TASKS[args.task]
    spec = importlib.util.spec_from_file_location("train_script", ROOT / path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    task = getattr(script, name)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    try:
        run = train(toy_config(args.runs_dir, *args.overrides), task, toy_data, args.resume)
    except Interrupted as e:
        print(e, flush=True)
        return 128 + e.signum
    print(f"RUN {run}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
