"""The README as a newcomer runs it: its Python API snippet executes as written on the shipped files."""

import re
from pathlib import Path

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
