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
TASKS = {"alpha": ("tasks.alpha", "PixArtAlphaTask"), "lcm": ("tasks.lcd", "LCMTask"),
         "controlnet": ("tasks.controlnet", "ControlNetTask")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs_dir")
    parser.add_argument("--resume")
    parser.add_argument("--task", choices=sorted(TASKS), default="alpha")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    module, name = TASKS[args.task]
    task = getattr(importlib.import_module(module), name)
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
