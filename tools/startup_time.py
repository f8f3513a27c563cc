"""How long the README's main command takes, beside `python -c "import torch"` (the floor any PyTorch program pays).

    python tools/startup_time.py                 # median of 5 wall times of each, run alternately
    python tools/startup_time.py --runs 9 --command "python sample/sample.py --prompt 'a small blue square'"

Each run is a fresh process (the way a person runs the command), timed from start to exit; the two commands
alternate so that a machine busy with something else slows both alike. The main command writes into a temporary
folder (--out), removed at the end. Prints both medians and their ratio (the README quotes them; the target is
a ratio under 2).
"""

import argparse
import logging
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = 'python sample/sample.py --prompt "a large red circle at the center"'
log = logging.getLogger("startup_time")


def wall_time(argv: list[str]) -> float:
    """Seconds from start to exit of one process (its output discarded); a failure is an error with its output."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: {shlex.join(argv)} exited {done.returncode}:\n{done.stdout.decode()[-2000:]}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each command (default 5)")
    parser.add_argument("--command", default=MAIN, help=f"the command to time (default: {MAIN})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.runs < 1:
        log.error("error: --runs must be >= 1, got %d", args.runs)
        return 2
    command = [sys.executable if part == "python" else part for part in shlex.split(args.command)]
    floor = [sys.executable, "-c", "import torch"]
    times: dict[str, list[float]] = {"torch": [], "command": []}
    with tempfile.TemporaryDirectory() as out:
        wall_time([*command, "--out", out])  # a warm-up of each: the page cache holds the libraries afterwards
        wall_time(floor)
        for i in range(args.runs):
            times["torch"].append(wall_time(floor))
            times["command"].append(wall_time([*command, "--out", out, "--no-progress"]))
            log.info("run %d/%d: import torch %.2f s, command %.2f s", i + 1, args.runs, times["torch"][-1],
                     times["command"][-1])
    torch_s, command_s = statistics.median(times["torch"]), statistics.median(times["command"])
    log.info("median of %d wall times: python -c \"import torch\" %.2f s; %s %.2f s; ratio %.2f", args.runs, torch_s,
             args.command, command_s, command_s / torch_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
