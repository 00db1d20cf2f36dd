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


def test_readme_langchain_example_runs(tmp_path: Path, capsys) -> None:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "KVPackChatModel(" in b]
    assert blocks, "README has no LangChain example"
    code = blocks[0].replace("~/.cache/kvpack/store", str(tmp_path / "store"))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'cache_read':" in out and "'strategy': 'exact'" in out
    assert "tool [{'name': 'search_knowledge'" not in out  # tool calls live on AI messages
    assert out.count("ai [{'name': 'search_knowledge'") == 2  # two forced retrievals, then an answer


def test_readme_steering_example_runs(tmp_path: Path, capsys) -> None:
    blocks = [
        b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "build_steering_vector(" in b
    ]
    assert blocks, "README has no steering example"
    code = blocks[0].replace("~/.cache/kvpack", str(tmp_path))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "['defensive:0.75', 'docstrings:0.5'] False" in out
    assert (tmp_path / "steering" / "defensive.safetensors").is_file()


def test_readme_packet_example_runs(tmp_path: Path, capsys) -> None:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "composition=" in b]
    assert blocks, "README has no KV Packet example"
    code = blocks[0].replace("~/.cache/kvpack", str(tmp_path))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert " packet False " in out and "3 documents composed from independently cached packets" in out
    assert "nothing recomputed" in out and "cached now" not in out  # the retriever stored them first
    assert len(list((tmp_path / "packets").rglob("*.safetensors"))) == 3


def test_readme_llama_index_example_runs(tmp_path: Path, capsys) -> None:
    found = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    blocks = [b for b in found if "KVPackQueryEngine(" in b]
    assert blocks, "README has no LlamaIndex example"
    code = blocks[0].replace("~/.cache/kvpack", str(tmp_path))
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("True [('exact', ") and "('text', " in lines[0]  # same answer, both arms ran
    kv_prefill, text_prefill = (int(x) for x in re.findall(r"'(?:exact|text)', (\d+)", lines[0]))
    assert kv_prefill < text_prefill / 3  # the stored pack was loaded, not prefilled
    assert lines[1] == "energy"
