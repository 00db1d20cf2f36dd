"""The README's Python example runs as written (slow tier: it uses the embedded default model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.default_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path: Path, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("~/.cache/kvpack/store", str(tmp_path / "store"))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "cached_tokens=" in out and "exact=True" in out
