"""The README as a newcomer runs it: its Python API snippet executes as written on the shipped files."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of a '## title' section of the README."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_the_python_api_snippet_runs_on_the_shipped_files(monkeypatch):
    """It once failed on the shipped fp16 files with fp32 inputs."""
    (code,) = re.findall(r"```python\n(.*?)```", section("Python API"), flags=re.S)
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    assert tuple(scope["out"].shape) == (1, 6, 32, 32) and scope["out"].dtype.is_floating_point
    assert scope["out"].isfinite().all()
    assert len(scope["fresh"].blocks) == 4


# ---------------------------------------------------------------------------------------------------------------
# Every figure the README quotes from docs/RESULTS.md equals its source there.

RESULTS = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")


def table_rows(marker: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table of RESULTS after the text `marker`, as {header: cell} (bold removed)."""
    lines = RESULTS[RESULTS.index(marker):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("*") for cell in line.strip().strip("|").split("|")])
    header = [name if name not in rows[0][:i] else f"{name} ({rows[0][:i].count(name) + 1})"
              for i, name in enumerate(rows[0])]  # a repeated column name (multi: position) gets "(2)"
    return [dict(zip(header, row)) for row in rows[2:]]


def table_after(marker: str) -> dict[str, dict[str, str]]:
    """That table keyed by its first column (which must then be unique)."""
    rows = table_rows(marker)
    keyed = {next(iter(row.values())): row for row in rows}
    assert len(keyed) == len(rows), f"the table after {marker!r} repeats first cells"
    return keyed


def row_where(marker: str, **cells: str) -> dict[str, str]:
    """The one row of the table after `marker` with these cells."""
    (row,) = [r for r in table_rows(marker) if all(r[k.replace("_", " ")] == v for k, v in cells.items())]
    return row


def sentence_number(pattern: str) -> str:
    """The number captured by `pattern` in RESULTS' text (exactly one match)."""
    (value,) = re.findall(pattern, RESULTS)
    return value


def quoted_figures() -> list[tuple[str, str]]:
    """(what the README must say, where RESULTS says it)."""
    teacher = table_after("Held-out captions, 600 images")["teacher, DPM-Solver 20, CFG 3"]
    student = table_after("Sampled with LCM and no guidance")["student, LCM 4"]
    int8 = table_after("Caption accuracy of the shipped student")
    fp32_row, int8_row = int8["student, LCM 4, fp32"], int8["student, LCM 4, int8"]
    single = ("single: kind", "colour", "size", "position", "count")
    int8_gap = max(abs(float(fp32_row[k]) - float(int8_row[k])) for k in single)
    quantize = table_after("`python tools/benchmark.py quantize --size 512 --reps 3`")
    h100 = row_where("NVIDIA H100 80GB (torch 2.11), `python tools/benchmark.py transformer", image="1024px",
                     dtype="fp32")
    h100_bf16 = row_where("NVIDIA H100 80GB (torch 2.11), `python tools/benchmark.py transformer", image="1024px",
                          dtype="bf16")
    cpu = row_where("This machine (2-core AMD EPYC, AVX2 only), `python tools/benchmark.py transformer",
                    image="256px", dtype="fp32")
    pipeline = table_after("One 1024 px image end to end (text encoding + denoising + VAE decoding)")
    lcd = table_after("One latent consistency distillation step of XL-2 at 1024-MS")[
        "full (611.3M trainable), bf16 (`train.frozen_dtype=bf16`)"]
    lcm4, dpm14 = "PixArt-δ LCM 4 steps, bf16, compiled", "PixArt-α DPM 14 steps, CFG 4.5, bf16, compiled"
    xl1024 = row_where("(`python tools/benchmark.py train --archs XL S", model="XL/2", image="1024px", batch="12")
    four = table_after("It is shipped as `weights/shapes/dmd4_student.safetensors` (int8-weights")
    dmd4 = four["four-step student (shipped, int8-weights), LCM 4 at 999, 639, 339, 119"]
    lcd4 = four["LCD student, LCM 4"]
    recipe = sentence_number(r"the recipe takes (\d+) minutes")
    distillation = sentence_number(r"400 steps at batch 32: ([\d.]+) minutes")
    controlnet = sentence_number(r"shapes_recipe.py controlnet` \(about (\d+) minutes")
    seconds = {name: round(float(row["ms/image"]) * 600 / 1000) for name, row in (("teacher", teacher),
                                                                                 ("student", student))}
    return [
        (f"kind {teacher['single: kind']}%, colour {teacher['colour']}%, position {teacher['position']}%",
         "teacher, DPM-Solver 20, CFG 3"),
        (f"colour {teacher['colour']}%, position {teacher['position']}% and kind {teacher['single: kind']}%",
         "teacher, DPM-Solver 20, CFG 3"),
        (f"kind {student['single: kind']}%, colour {student['colour']}%, position {student['position']}%",
         "student, LCM 4"),
        (f"colour {student['colour']}%, position {student['position']}%\nand kind {student['single: kind']}%",
         "student, LCM 4"),
        (f"within {int8_gap:.1f} points of fp32", "student, LCM 4, fp32 / int8"),
        (f"int8 {quantize['ours int8']['speed-up vs diffusers fp32']}x faster, int8 compiled "
         f"{quantize['ours int8, compiled']['speed-up vs diffusers fp32']}x, with a relative output error of "
         f"{float(quantize['ours int8']['relative error']) * 100:.1f}%", "quantize table"),
        (f"takes {h100['ours (s)']} s in fp32\nagainst diffusers' {h100['diffusers (s)']} s",
         "H100 transformer 1024px fp32"),
        (f"and {h100_bf16['ours (s)']} s in bf16 against {h100_bf16['diffusers (s)']} s", "H100 transformer bf16"),
        (f"(256 px fp32: {cpu['ours (s)']} s against {cpu['diffusers (s)']} s)", "CPU transformer"),
        (f"PixArt-δ (LCM 4 steps) takes {pipeline[lcm4]['ours total (s)']} s "
         f"(diffusers {pipeline[lcm4]['diffusers total (s)']} s)", "H200 pipeline"),
        (f"PixArt-α (DPM-Solver 14 steps) {pipeline[dpm14]['ours total (s)']} s "
         f"(diffusers {pipeline[dpm14]['diffusers total (s)']} s)", "H200 pipeline"),
        (f"eagerly {pipeline['PixArt-δ LCM 4 steps, bf16 eager']['ours total (s)']} s and "
         f"{pipeline['PixArt-α DPM 14 steps, CFG 4.5, bf16 eager']['ours total (s)']} s", "H200 pipeline"),
        (f"takes {lcd['s/step']} s in {lcd['peak GPU memory (MiB)'].split(' ')[0]} MiB", "H200 LCD step"),
        (f"{xl1024['samples/s']} samples/s in {xl1024['peak memory (MB)']} MB", "H100 training step"),
        (f"kind {dmd4['single: kind']} and mean {dmd4['mean']} against the\nLCD student's {lcd4['single: kind']} and "
         f"{lcd4['mean']}, FD {dmd4['FD']} against {lcd4['FD']}", "four-step student (shipped, the default), test"),
        (f"single objects: kind {dmd4['single: kind']}%, colour {dmd4['colour']}%, position {dmd4['position']}% (mean "
         f"of five attributes {dmd4['mean']}; FD {dmd4['FD']}", "shipped four-step student, test"),
        (f"# {recipe} minutes: data", "recipe time"),
        (f"({recipe} minutes on 2 cores)", "recipe time"),
        (f"# {distillation} minutes of distillation", "student time"),
        (f"({distillation} minutes of training)", "student time"),
        (f"# the ControlNet branch (about {controlnet} minutes)", "ControlNet recipe time"),
        (f"`python train/shapes_recipe.py controlnet` (about {controlnet} minutes)", "ControlNet recipe time"),
        (f"about {seconds['student']} s\nof sampling for the student, {seconds['teacher']} s for the teacher",
         "ms/image x 600"),
    ]


def test_every_figure_the_readme_quotes_equals_its_source_in_results():
    missing = [f"{text!r} (from RESULTS: {source})" for text, source in quoted_figures() if text not in README]
    assert not missing, "the README does not quote RESULTS as it says now:\n" + "\n".join(missing)


# ---------------------------------------------------------------------------------------------------------------
# The README's distillation and ControlNet sections, run as written on a fresh clone (smaller and shorter).


def commands(title: str, first_word: str = "python") -> list[str]:
    """The shell commands of a README section's bash blocks (continuation lines joined, comments dropped)."""
    text = "\n".join(re.findall(r"```bash\n(.*?)```", section(title), flags=re.S)).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.startswith(first_word)]


@pytest.mark.slow
def test_the_distillation_and_controlnet_sections_run_as_written(tmp_path):
    """Data, features and training as the README shows them: 48 scenes instead of 2,000 and 2 training steps, in a
    temporary folder instead of work/shapes; everything else as written."""
    import shlex
    import subprocess
    import sys

    lcd = commands("Latent consistency distillation (PixArt-δ)")
    control = commands("ControlNet (PixArt-δ's ControlNet-Transformer)")
    chain = [lcd[0], lcd[1], lcd[2], control[1], control[2]]
    assert "make_synthetic_data.py" in chain[0] and "train_lcm.py --config lcm_shapes" in chain[2]
    assert "--control edge" in chain[3] and "train_controlnet.py --config controlnet_shapes" in chain[4]
    work = tmp_path / "shapes"
    short = ["--set", f"train.runs_dir={work / 'runs'}", "--set", "train.steps=2", "--set", "train.sample_every=0",
             "--set", "train.checkpoint_every=2", "--set", "train.batch_size=8"]
    for line in chain:
        argv = shlex.split(line.replace("work/shapes", str(work)).replace("--num 2000", "--num 48"))
        argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
        if "train/" in argv[1]:
            cache = work / ("cache-edge" if "controlnet" in argv[1] else "cache")
            argv += [*short, "--set", f"data.cache_dir={cache}"]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    runs = sorted(p.name for p in (work / "runs").iterdir())
    assert [r.split("-", 1)[1] for r in runs] == ["lcm-shapes", "controlnet-shapes"]
    assert all((work / "runs" / r / "checkpoints" / "step_00000002.pt").is_file() for r in runs)
