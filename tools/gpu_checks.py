"""Every GPU measurement of the paper's headline claims, and every CUDA path of sample.py, in one run.

    bash tools/gpu_checks.sh OUT_DIR              # the same as: python tools/gpu_checks.py --out OUT_DIR
    python tools/gpu_checks.py --out OUT --only pipeline memory --budget-s 300

Made for a lent H100/H200 (about 9 minutes). Each check is its own process (tools/benchmark.py, or sample.py for
the command-line checks) with a time limit; a check that fails or runs out of time is recorded with the end of its
output and the run goes on. After every check OUT/gpu_checks.md (the Markdown tables, ready for docs/RESULTS.md)
and OUT/gpu_checks.json (every row, with exit codes and times) are rewritten, so a run cut short keeps what it
measured. Checks run in order of importance and are skipped once --budget-s would be exceeded.

What runs (XL-2 1024-MS, random weights of the real sizes, T5 with T5-XXL's 24 layers):
  vae        the SD VAE decoder at 1024 px: diffusers' default against channels-last / compiled (writes the shared
             pipeline folder first)
  pipeline   one 1024 px image end to end, PixArt-delta LCM 4 and PixArt-alpha DPM-Solver 14 (CFG 4.5), ours in
             bf16 eager, int8, fp8 and compiled (+ fp8) against diffusers.PixArtAlphaPipeline in bf16, interleaved;
             image deviation of every variant against ours in bf16
  memory     peak GPU memory of one 1024 px image with int8 T5-XXL (encode, free) and the transformer in bf16 / int8
  train      one PixArt-alpha training step, batch 12, gradient checkpointing, bf16: samples/s and peak memory
  lcd        one latent consistency distillation step (full, LoRA 32; teacher stored fp32 / bf16), same settings
  dmd        one DMD2 fake-score update and one generator update (tasks/dmd.py), same settings
  control    one ControlNet-Transformer (N = 13) training step against the base's own, and the branch's share of a
             sampling forward (N = 1, 13; UNet design N = 14)
  cli        sample.py on CUDA once with every flag that touches it (--dtype, --quantize, --compile, --low-memory,
             --control, together), exit codes checked; CUDA out of memory gives the --batch-size message; --compile
             without triton falls back with a warning
  sigma-kv   PixArt-Sigma (XL-2, 300-token captions) at 1024 and 2048 px: one forward uncompressed against KV
             compression on blocks 14..27 (4x fewer keys and values there), interleaved: the speed-up
  quantize   one XL-2 forward in fp32 / int8 / fp8, eager and compiled, against diffusers fp32
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Check:
    """One step of the run: a benchmark.py command (or the CLI checks), its time limit and its table's title."""

    name: str
    title: str
    argv: list[str] = field(default_factory=list)  # tools/benchmark.py arguments; empty: the check is a function
    timeout_s: int = 120
    min_s: int = 30  # skipped when less than this is left of the budget


SMOKE = {"1024": "256", "XL": "T", "12": "2", "10": "1", "5": "1", "3": "1",  # --smoke: toy sizes, one repetition
         "transformer:13": "transformer:3", "unet:14": "unet:3"}


def checks(folder: Path, smoke: bool = False) -> list[Check]:
    """The run's checks in order of importance; smoke: the same commands at toy sizes on this machine's device."""
    f = ["--folder", str(folder)]
    if smoke:
        f += ["--t5-layers", "1", "--arch", "T"]
    found = [
        Check("vae", "SD VAE decoder, 1024 px, bf16", ["vae", "--size", "1024", "--dtype", "bf16", "--reps", "10",
                                                        *f], 240, 60),
        Check("pipeline", "One 1024 px image end to end against diffusers.PixArtAlphaPipeline (bf16)",
              ["pipeline", "--size", "1024", "--dtype", "bf16", "--reps", "5", "--cases", "lcm4", "dpm14",
               "--variants", "float", "int8", "fp8", "compiled", "fp8-compiled", "compiled-cg", *f], 330, 90),
        Check("memory", "Peak GPU memory of one 1024 px PixArt-delta image, T5-XXL in int8 (--low-memory)",
              ["memory", "--size", "1024", "--dtype", "bf16", "--modes", "none", "int8", *f], 150, 40),
        Check("lcd", "Latent consistency distillation step, XL-2 1024-MS, batch 12",
              ["lcd", "--archs", "XL", "--size", "1024", "--batch", "12", "--lora-ranks", "0", "32",
               "--checkpointing", "on", "--dtypes", "bf16", "--frozen-dtypes", "fp32", "bf16", "--reps", "3"], 200, 40),
        Check("dmd", "DMD2 updates (fake score, generator), XL-2 1024-MS, batch 12",
              ["lcd", "--dmd", "--archs", "XL", "--size", "1024", "--batch", "12", "--checkpointing", "on",
               "--dtypes", "bf16", "--frozen-dtypes", "bf16", "--reps", "2"], 150, 40),
        Check("train", "PixArt-alpha training step, XL-2 1024-MS, batch 12",
              ["train", "--archs", "XL", "--size", "1024", "--batch", "12", "--checkpointing", "on", "--dtypes",
               "bf16", "--reps", "3"], 120, 30),
        Check("control-train", "ControlNet-Transformer training step, XL-2 1024-MS, batch 12",
              ["control", "--train", "--size", "1024", "--batch", "12", "--dtype", "bf16", "--variants",
               "transformer:13", "--frozen-dtype", "bf16", "--reps", "3"], 120, 30),
        Check("cli", "sample.py on CUDA: every flag that touches it", [], 200, 40),
        Check("control", "ControlNet branch's share of a sampling forward, 1024 px, bf16",
              ["control", "--size", "1024", "--dtype", "bf16", "--variants", "transformer:1", "transformer:13",
               "unet:14", "--reps", "10"], 90, 20),
        Check("sigma-kv", "PixArt-Sigma KV compression on half the blocks (14..27) against none, XL-2, bf16",
              ["kv", "--sizes", "1024", "2048", "--dtype", "bf16", "--reps", "5"], 120, 30),
        Check("quantize", "One XL-2 forward at 1024 px: fp32 / int8 / fp8, eager and compiled, vs diffusers fp32",
              ["quantize", "--size", "1024", "--modes", "int8", "fp8", "--reps", "10", "--no-images"], 200, 60),
    ]
    if smoke:
        for check in found:
            check.argv = [SMOKE.get(a, a) for a in check.argv]
            if check.name == "sigma-kv":  # the smallest Sigma size, two blocks
                check.argv = ["kv", "--sizes", "512", "--arch", "T", "--depth", "2", "--dtype", "fp32", "--reps", "1"]
            if check.name in ("vae", "pipeline", "memory"):  # bf16 is slow on CPUs without it
                check.argv = ["fp32" if a == "bf16" else a for a in check.argv]
    return found


def run(argv: list[str], timeout_s: float, env: dict | None = None) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, the output, seconds)."""
    start = time.perf_counter()
    try:
        env = {**os.environ, **(env or {})}
        if os.environ.get("PYTHONPATH") and env["PYTHONPATH"] != os.environ["PYTHONPATH"]:  # keep what was there
            env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env=env)
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        return None, out, time.perf_counter() - start


def table_lines(output: str) -> list[str]:
    """The Markdown table a benchmark printed (its header and rows, in order)."""
    return [line for line in output.splitlines() if line.startswith("|")]


# ----------------------------------------------------------------------------------------------------------
# sample.py on CUDA

def cli_fixtures(tmp: Path) -> dict[str, str]:
    """A tiny PixArt (safetensors), its T5 and VAE folders, a ControlNet branch for it and an edge map."""
    import torch
    from PIL import Image

    from models.checkpoint import save_checkpoint
    from models.controlnet import ControlConfig, build_branch, save_branch
    from models.pixart import PixArtConfig, build_pixart
    from models.shipped import content_hash
    from tools.random_weights import write_tiny_t5, write_tiny_vae

    t5 = write_tiny_t5(tmp / "t5", d_model=32)
    vae = write_tiny_vae(tmp / "vae")
    cfg = PixArtConfig(arch="T", depth=2, hidden_size=96, num_heads=4, caption_channels=32, latent_size=32,
                       pe_interpolation=0.5)
    torch.manual_seed(0)
    model = build_pixart(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    checkpoint = tmp / "tiny.safetensors"
    save_checkpoint(model.state_dict(), cfg, checkpoint, "safetensors")
    branch = build_branch(model, ControlConfig(design="transformer", num_blocks=1))
    save_branch(branch, model, tmp / "branch.safetensors", content_hash(checkpoint))
    edges = torch.zeros(256, 256, 3, dtype=torch.uint8)
    edges[64:192, 64], edges[64:192, 191], edges[64, 64:192], edges[191, 64:192] = 255, 255, 255, 255
    Image.fromarray(edges.numpy()).save(tmp / "edges.png")
    notriton = tmp / "notriton" / "triton"  # a triton that fails to import, as on a machine without it
    notriton.mkdir(parents=True)
    (notriton / "__init__.py").write_text("raise ImportError('triton hidden by tools/gpu_checks.py')\n")
    return dict(checkpoint=str(checkpoint), t5=str(t5), vae=str(vae), branch=str(tmp / "branch.safetensors"),
                edges=str(tmp / "edges.png"), notriton=str(notriton.parent))


def cli_cases(fx: dict[str, str], gpu: bool = True) -> list[tuple[str, list[str], dict, int, str]]:
    """(name, sample.py arguments beside base_args, extra environment, expected exit code, text the output must
    hold). gpu: also the cases only a GPU can run (out of memory, triton)."""
    control = ["--control", fx["edges"], "--control-checkpoint", fx["branch"]]
    return [
        ("fp32", [], {}, 0, "wrote"),
        ("--dtype bf16", ["--dtype", "bf16"], {}, 0, "wrote"),
        ("--dtype fp16", ["--dtype", "fp16"], {}, 0, "wrote"),
        ("--quantize int8", ["--quantize", "int8", "--dtype", "bf16"], {}, 0, "wrote"),
        ("--quantize fp8", ["--quantize", "fp8", "--dtype", "bf16"], {}, 0, "wrote"),
        ("--compile", ["--compile", "--dtype", "bf16"], {}, 0, "wrote"),
        ("--low-memory", ["--low-memory", "--dtype", "bf16"], {}, 0, "wrote"),
        ("--control", [*control, "--dtype", "bf16"], {}, 0, "wrote"),
        ("--control --quantize fp8 --compile --low-memory", [*control, "--quantize", "fp8", "--compile",
                                                             "--low-memory", "--dtype", "bf16"], {}, 0, "wrote"),
    ] + ([] if not gpu else [
        ("--compile without triton", ["--compile", "--dtype", "bf16"],
         {"PYTHONPATH": f"{fx['notriton']}{os.pathsep}{ROOT}"}, 0, "triton is not installed"),
        ("CUDA out of memory (4096 px, batch 128)", ["--width", "4096", "--height", "4096", "--images-per-prompt",
                                                      "128", "--batch-size", "128", "--steps", "1", "--sampler",
                                                      "lcm", "--set", "sample.guidance=0"], {}, 2, "--batch-size"),
    ])


def cli_check(budget_s: float, device: str = "cuda", only: list[str] | None = None) -> tuple[int, str, list[dict]]:
    """Run every CLI case (or those named in `only`); rows of (case, exit code, expected, seconds, verdict, the
    output's last line)."""
    rows, lines = [], ["| sample.py on CUDA | exit code (expected) | s | result | last line |", "|---|---|---|---|---|"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fx = cli_fixtures(Path(tmp))
        for name, extra, env, expected, needle in cli_cases(fx, gpu=device != "cpu"):
            if only and name not in only:
                continue
            left = budget_s - (time.perf_counter() - start)
            if left < 10:
                rows.append(dict(case=name, verdict="skipped: out of time"))
                continue
            argv = [sys.executable, "sample/sample.py", *base_args(fx, Path(tmp) / "outputs", device), *extra]
            code, output, seconds = run(argv, min(90, left), {"PYTHONPATH": str(ROOT), **env})
            ok = code == expected and needle in output
            last = next((ln for ln in reversed(output.strip().splitlines()) if ln.strip()), "")[-160:]
            rows.append(dict(case=name, exit_code=code, expected=expected, seconds=seconds,
                             verdict="ok" if ok else "FAILED", last_line=last, output_tail=output[-3000:]))
            lines.append(f"| {name} | {code} ({expected}) | {seconds:.1f} | {rows[-1]['verdict']} | "
                         f"{last.replace('|', '/')} |")
    failed = sum(r["verdict"] == "FAILED" for r in rows)
    return (1 if failed else 0), "\n".join(lines), rows


def base_args(fx: dict[str, str], out: Path, device: str = "cuda") -> list[str]:
    """sample.py arguments every CLI case shares: the tiny model on CUDA, 4 DPM-Solver steps with CFG 3."""
    return ["--config", "pixart_alpha_1024", "--checkpoint", fx["checkpoint"], "--width", "256", "--height", "256",
            "--set", f"text_encoder.path={fx['t5']}", "--set",
            f"autoencoder.path={fx['vae']}", "--set", "sample.guidance=3", "--prompt", "a red circle", "--device",
            device, "--steps", "4", "--no-progress", "--out", str(out)]


# ----------------------------------------------------------------------------------------------------------

def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    for package in ("diffusers", "transformers", "torchao", "triton"):
        try:
            info[package] = __import__(package).__version__
        except Exception as e:  # noqa: BLE001 - a missing or broken package is what this records
            info[package] = f"missing ({type(e).__name__})"
    return info


def write_report(out: Path, env: dict, results: list[dict]) -> None:
    lines = [f"# GPU checks: {env.get('gpu', 'no GPU')}, torch {env['torch']}, CUDA {env.get('cuda')}",
             "", "`" + json.dumps(env) + "`", ""]
    for r in results:
        status = {0: "ok", None: "TIMED OUT", "skipped": "skipped"}.get(r["exit_code"],
                                                                         f"FAILED (exit {r['exit_code']})")
        lines += [f"## {r['title']}", "", f"`{r['command']}`: {status} in {r['seconds']:.0f} s", ""]
        lines += r["table"] or ["(no rows)"]
        if r["exit_code"] not in (0, "skipped"):
            lines += ["", "```", *r["output_tail"].splitlines()[-25:], "```"]
        lines.append("")
    (out / "gpu_checks.md").write_text("\n".join(lines) + "\n")
    (out / "gpu_checks.json").write_text(json.dumps({"environment": env, "checks": results}, indent=1,
                                                    default=str) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_checks", help="folder for gpu_checks.md, gpu_checks.json, log.txt")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting checks after this many seconds")
    parser.add_argument("--only", nargs="+", help="run only these checks (names as in the module docstring)")
    parser.add_argument("--smoke", action="store_true",
                        help="the same checks at toy sizes (tiny transformer, 256 px, one repetition) on this "
                             "machine's device: checks the script itself, e.g. on a CPU")
    parser.add_argument("--cli-cases", type=lambda v: v.split(","), metavar="CASE,CASE",
                        help="run only these cases of the cli check, comma-separated names as in its table "
                             "(e.g. --cli-cases=fp32,--control)")
    parser.add_argument("--folder", help="where the shared random XL-2 pipeline folder lives (default: a temporary "
                                         "folder, removed at the end)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = environment()
    print(json.dumps(env), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or Path(tmp) / "xl-pipeline")
        log = open(out / "log.txt", "a")  # noqa: SIM115 - appended to check by check
        for check in checks(folder, args.smoke):
            if args.only and check.name not in args.only:
                continue
            left = args.budget_s - (time.perf_counter() - start)
            if left < check.min_s:
                results.append(dict(name=check.name, title=check.title, command="-", exit_code="skipped",
                                    seconds=0.0, table=[f"skipped: {left:.0f} s of the budget left"], rows=[],
                                    output_tail=""))
                write_report(out, env, results)
                continue
            limit = min(check.timeout_s, left)
            print(f"== {check.name} (at most {limit:.0f} s)", flush=True)
            json_path = out / f"{check.name}.json"
            if check.argv:
                command = ["python", "tools/benchmark.py", *check.argv, "--json", str(json_path)]
                code, output, seconds = run([sys.executable, *command[1:]], limit, {"PYTHONPATH": str(ROOT)})
                rows = json.loads(json_path.read_text())["rows"] if json_path.is_file() else []
                table = table_lines(output)
            else:
                command = ["python", "tools/gpu_checks.py", "--only", "cli"]
                t0 = time.perf_counter()
                try:
                    code, text, rows = cli_check(limit, "cpu" if args.smoke else "cuda", args.cli_cases)
                    output = text
                except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
                    code, text, rows, output = 1, "", [], f"{type(e).__name__}: {e}"
                seconds = time.perf_counter() - t0
                table = text.splitlines()
            json_path.unlink(missing_ok=True)
            log.write(f"\n==== {check.name}: exit {code}, {seconds:.0f} s\n{output}\n")
            log.flush()
            results.append(dict(name=check.name, title=check.title, command=" ".join(command[:2] + check.argv),
                                exit_code=code, seconds=seconds, table=table, rows=rows,
                                output_tail=output[-6000:]))
            write_report(out, env, results)
            print("\n".join(table[-12:]), flush=True)
        log.close()
    print(f"done in {time.perf_counter() - start:.0f} s: {out / 'gpu_checks.md'}", flush=True)
    return 0 if all(r["exit_code"] in (0, "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
