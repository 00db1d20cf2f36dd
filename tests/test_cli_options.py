"""Layer 9: what the command line refuses up front, and how it fails when the system refuses (a read-only
store, a full disk), on tiny models saved to disk."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest

from kvpack_integrations import PackStore, build_pack
from kvpack_integrations.cli.main import main
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.runtime.loader import load_model

from .conftest import FACTS, QUESTION
from .support.tiny_models import save_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_model_dir("qwen2", tmp_path_factory.mktemp("models"))


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Default stores (pack, packet, Chroma) under the test's folder, never the user's."""
    monkeypatch.setenv("KVPACK_HOME", str(tmp_path / "home"))
    for name in ("KVPACK_STORE", "KVPACK_PACKETS", "KVPACK_KB"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    path = tmp_path / "facts.txt"
    path.write_text("\n".join(FACTS) + "\n")
    return path


def run(capsys, *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # --json: one line, one object
    return code, json.loads(out[0])


def no_model(monkeypatch, *modules: str) -> None:
    """Fail the test if a command loads the language model (it should have refused before)."""

    def refuse(args):
        raise AssertionError("the model was loaded for a command that could not succeed")

    for module in modules:
        monkeypatch.setattr(f"kvpack_integrations.cli.{module}.loaded_model", refuse)


def test_build_refuses_options_it_would_ignore_before_any_work(capsys, tmp_path, model_dir, facts_file, monkeypatch):
    no_model(monkeypatch, "build")
    store = tmp_path / "s"
    common = [str(facts_file), "--kb", "demo", "--model", model_dir, "--store", str(store), "--json"]
    cases = [
        (["--packet-store", str(tmp_path / "p")], "--packet-store would be ignored: without --packets"),
        (["--packet-adapter", "none"], "--packet-adapter would be ignored: without --packets"),
        (["--port", "9000"], "--port would be ignored: without --host"),
        (
            ["--packets", "blend", "--packet-adapter", str(tmp_path / "missing.safetensors")],
            "--packet-adapter would be ignored: --packets blend caches plain packets",
        ),
        (["--host", "localhost", "--kb-dir", str(tmp_path / "kb")], "--kb-dir would be ignored: --host uses"),
        (["--chroma", "--storage-dtype", "float16"], "--storage-dtype would be ignored: --chroma builds a Chroma"),
        (["--chroma", "--instruction", "Facts:"], "--instruction would be ignored: --chroma builds a Chroma"),
    ]
    for extra, problem in cases:
        code, err = run(capsys, "build", *common, *extra)
        assert code == 2 and err["type"] == "InvalidInputError" and err["error"].startswith(problem), extra
    chroma = ["build", str(facts_file), "--kb", "demo", "--chroma", "--kb-dir", str(tmp_path / "kb"), "--json"]
    code, err = run(capsys, *chroma, "--model", model_dir)  # a Chroma base alone loads no language model
    assert code == 2 and err["error"].startswith("--model would be ignored: a Chroma knowledge base is built")
    assert not store.exists() and not (tmp_path / "kb").exists() and not (tmp_path / "p").exists()


def test_build_packets_fails_before_the_pack_is_written(capsys, tmp_path, model_dir, facts_file):
    """No adapter is shipped for a tiny model, and a missing --packet-adapter file is missing: either way the
    build fails before it writes the pack (it used to fail after, leaving the pack behind)."""
    store = tmp_path / "s"
    common = [str(facts_file), "--kb", "demo", "--model", model_dir, "--store", str(store), "--json"]
    packets = ["--packets", "packet", "--packet-store", str(tmp_path / "p")]
    code, err = run(capsys, "build", *common, *packets)
    assert code == 2 and "no packet adapter for" in err["error"]
    assert not PackStore(store).exists("demo")
    missing = tmp_path / "missing.safetensors"
    code, err = run(capsys, "build", *common, *packets, "--packet-adapter", str(missing))
    assert code == 2 and str(missing) in err["error"]
    assert not PackStore(store).exists("demo")
    code, built = run(capsys, "build", *common, "--packets", "blend", "--packet-store", str(tmp_path / "p"))
    assert code == 0 and built["packets"] == {"composition": "blend", "built": 3, "store": str(tmp_path / "p")}


def test_a_read_only_store_is_refused_before_the_model_loads(capsys, tmp_path, model_dir, facts_file, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    real_access = os.access

    def access(path, mode, **kwargs):  # root writes anywhere: say what a user would be told
        if Path(path) == read_only and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    no_model(monkeypatch, "build")
    try:
        common = [str(facts_file), "--kb", "demo", "--model", model_dir, "--json"]
        code, err = run(capsys, "build", *common, "--store", str(read_only))
        assert (
            code == 2
            and err["error"] == f"the pack store {read_only / 'packs'} cannot be created: {read_only} is not writable"
        )
        store = str(tmp_path / "s")
        code, err = run(
            capsys, "build", *common, "--store", store, "--packets", "blend", "--packet-store", str(read_only)
        )
        assert code == 2 and err["error"] == f"the packet store {read_only} is not writable"
        assert not (tmp_path / "s").exists()
    finally:
        read_only.chmod(0o755)


def _mkdtemp_refused(packs: Path) -> OSError:  # mkdtemp in a folder turned read-only
    return PermissionError(errno.EACCES, "Permission denied", str(packs / ".build-demo-x"))


def _disk_full(packs: Path) -> OSError:  # a write to a full disk names no file
    return OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize(
    ("error", "line"),
    [(_mkdtemp_refused, "Permission denied: {packs}/.build-demo-x"), (_disk_full, "No space left on device: {packs}")],
)
def test_an_os_error_is_one_line_naming_the_path(capsys, tmp_path, model_dir, facts_file, monkeypatch, error, line):
    """A permission or disk-full error while the pack is written: one line naming the path, not a traceback."""
    packs = tmp_path / "s" / "packs"
    raised, line = error(packs), line.format(packs=packs)

    def failing_build(*args, **kwargs):
        raise raised

    monkeypatch.setattr("kvpack_integrations.cli.build.build_pack", failing_build)
    argv = ["build", str(facts_file), "--kb", "demo", "--model", model_dir, "--store", str(tmp_path / "s")]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"kvpack: error: {line}\n"
    code, err = run(capsys, *argv, "--json")
    assert code == 1 and err == {"error": line, "type": type(raised).__name__}
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture
def pack_store_dir(tmp_path, model_dir) -> Path:
    """A store holding the pack 'demo' of the three facts."""
    loaded = load_model(model_dir)
    build_pack(loaded, RadixTree(loaded.fingerprint), PackStore(tmp_path / "s"), "demo", FACTS)
    return tmp_path / "s"


def test_ask_refuses_sampling_options_under_greedy_decoding_and_a_port_without_a_host(
    capsys, tmp_path, model_dir, pack_store_dir, monkeypatch
):
    no_model(monkeypatch, "ask")
    common = ["ask", QUESTION, "--kb", "demo", "--model", model_dir, "--store", str(pack_store_dir), "--json"]
    for extra, problem in (
        (["--top-p", "0.9"], "--top-p would be ignored: --temperature 0 decodes greedily"),
        (["--seed", "3"], "--seed would be ignored: --temperature 0 decodes greedily"),
        (["--temperature", "0", "--top-p", "0.5", "--seed", "1"], "--top-p, --seed would be ignored"),
        (["--port", "9000"], "--port would be ignored: without --host"),
        (["--host", "localhost", "--kb-dir", str(tmp_path / "kb")], "--kb-dir would be ignored: --host uses"),
        (["--mode", "blend", "--packet-adapter", "none"], "--packet-adapter would be ignored: --mode blend composes"),
    ):
        code, err = run(capsys, *common, *extra)
        assert code == 2 and err["type"] == "InvalidInputError" and err["error"].startswith(problem), extra


def test_ask_samples_with_top_p_and_seed(capsys, model_dir, pack_store_dir):
    common = ["ask", QUESTION, "--kb", "demo", "--model", model_dir, "--store", str(pack_store_dir), "--json"]
    sampled = [*common, "--temperature", "0.8", "--top-p", "0.9", "--seed", "5", "--max-new-tokens", "6"]
    code, first = run(capsys, *sampled)
    code2, again = run(capsys, *sampled)
    assert code == code2 == 0 and first["answer"] == again["answer"]  # the seed makes sampling reproducible


def test_ask_prints_the_usage_notes_in_text_mode(capsys, tmp_path, model_dir, pack_store_dir):
    """The usage notes (how approximate, packets cached now, segments computed elsewhere, stored files
    replaced) reached --json users only: text mode prints each on a `note:` line after the usage line."""
    argv = ["ask", QUESTION, "--kb", "demo", "--mode", "blend", "--packet-store", str(tmp_path / "p")]
    argv += ["--max-new-tokens", "4", "--model", model_dir, "--store", str(pack_store_dir)]
    assert main(argv) == 0  # first use: the packets are cached now, and the note says so
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert lines[-1].startswith("note: approximate: 3 documents composed") and "3 of them cached now" in lines[-1]
    assert main(argv) == 0
    text = capsys.readouterr().out
    code, js = run(capsys, *argv, "--json")
    assert code == 0 and text.startswith(js["answer"])  # the answer comes first, as it did
    lines = text.rstrip("\n").split("\n")
    usage_at = next(i for i, line in enumerate(lines) if line.startswith("[blend] "))
    assert js["usage"]["notes"] and lines[usage_at + 1 :] == [f"note: {note}" for note in js["usage"]["notes"]]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_list_refuses_what_it_would_ignore_and_lists_packs_when_chroma_is_down(capsys, tmp_path, pack_store_dir):
    store = ["list", "--store", str(pack_store_dir), "--json"]
    code, err = run(capsys, *store, "--port", "9000")
    assert code == 2 and err["error"].startswith("--port would be ignored: without --host")
    a_file = tmp_path / "facts.txt"
    a_file.write_text("not a Chroma directory\n")
    code, err = run(capsys, *store, "--kb-dir", str(a_file))
    assert code == 2 and err["error"] == f"the Chroma directory {a_file} is a file, not a folder"
    port = str(_closed_port())
    code, listing = run(capsys, *store, "--host", "127.0.0.1", "--port", port)
    assert code == 2 and [k["kb"] for k in listing["knowledge_bases"]] == ["demo"]  # the packs are still listed
    assert listing["chroma_knowledge_bases"] == [] and "cannot reach a Chroma server" in listing["chroma_error"]
    assert main([*store[:-1], "--host", "127.0.0.1", "--port", port]) == 2
    text = capsys.readouterr().out
    assert text.startswith("demo: 3 facts") and "Chroma knowledge bases not listed: cannot reach" in text
