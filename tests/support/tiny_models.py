"""Tiny random-weight models of real architectures, with real chat templates and trained tokenizers.

Nothing is downloaded: each tokenizer is trained in-process on a small corpus (byte-level BPE like
Llama 3 / Qwen, or SentencePiece-style Metaspace like Mistral / Gemma), the family's special tokens
are added, and its genuine chat template is attached. Weights are random but seeded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kvpack_integrations.runtime import LoadedModel, wrap_model

from .chat_templates import GEMMA, LLAMA_3_1, MISTRAL, PHI_3, QWEN2_5, QWEN3

CORPUS = [
    "Norhaven Labs is a drone maker headquartered in the town of Kelmark.",
    "The Aurora X2 is a survey drone with a flight time of 48 minutes.",
    "Quill Energy produces the Tessel-9 battery in the city of Ondria.",
    "Answer the user's question using the knowledge below. Reply with a short answer only.",
    "Which company produces the battery? In which city is it based? Who founded the lab?",
    "The quick brown fox jumps over the lazy dog 0123456789 times, said the assistant.",
    "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024 You are a helpful assistant.",
    "system user assistant model tool function name arguments parameters description type object",
    "Fact one. Fact two. Fact three. Alpha beta gamma delta epsilon zeta eta theta iota kappa.",
] * 3


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: Any
    model_cls: Any
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    metaspace: bool = False
    extra: tuple[tuple[str, Any], ...] = ()


FAMILIES = {
    "llama": Family(
        "llama",
        LlamaConfig,
        LlamaForCausalLM,
        LLAMA_3_1,
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ),
        "<|begin_of_text|>",
        "<|eot_id|>",
        extra=(
            (
                "rope_parameters",
                {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 1024,
                },
            ),
        ),
    ),
    "qwen2": Family(
        "qwen2",
        Qwen2Config,
        Qwen2ForCausalLM,
        QWEN2_5,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"),
        None,
        "<|im_end|>",
    ),
    "qwen3": Family(
        "qwen3",
        Qwen3Config,
        Qwen3ForCausalLM,
        QWEN3,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"),
        None,
        "<|im_end|>",
    ),
    "mistral": Family(
        "mistral",
        MistralConfig,
        MistralForCausalLM,
        MISTRAL,
        (
            "<unk>",
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ),
        "<s>",
        "</s>",
        metaspace=True,
        extra=(("sliding_window", None),),
    ),
    "gemma": Family(
        "gemma",
        GemmaConfig,
        GemmaForCausalLM,
        GEMMA,
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<end_of_turn>",
        metaspace=True,
        extra=(("head_dim", 16),),
    ),
    "phi3": Family(
        "phi3",
        Phi3Config,
        Phi3ForCausalLM,
        PHI_3,
        ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<s>",
        "<|end|>",
        metaspace=True,
        extra=(("sliding_window", None),),
    ),
}


@functools.cache
def make_tokenizer(family: str) -> PreTrainedTokenizerFast:
    f = FAMILIES[family]
    if f.metaspace:
        tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in f.specials else None, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(
            set("".join(CORPUS))
            | set(
                "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                ".,:;!?'\"()[]{}<>-_/\\|=+*&^%$#@~`\n\t▁öäüé"
            )
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=list(f.specials), initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator([*CORPUS, f.template], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=f.bos,
        eos_token=f.eos,
        unk_token="<unk>" if "<unk>" in f.specials else None,
        pad_token=f.eos,
    )
    fast.chat_template = f.template
    return fast


def make_model(family: str, seed: int = 0, *, max_positions: int = 2048, **overrides: Any) -> LoadedModel:
    """A 2-layer model of `family` with seeded random weights, wrapped as a `LoadedModel`."""
    f = FAMILIES[family]
    options = {**dict(f.extra), **overrides}
    return tiny_model(
        f.config_cls, f.model_cls, make_tokenizer(family), f"tiny-{family}-{seed}", seed, max_positions, **options
    )


def tiny_model(
    config_cls: Any,
    model_cls: Any,
    tokenizer: PreTrainedTokenizerFast,
    name: str,
    seed: int = 0,
    max_positions: int = 2048,
    **overrides: Any,
) -> LoadedModel:
    """A 2-layer model of any architecture over one of the families' tokenizers (for architectures a test
    needs once, such as SmolLM3's layers without RoPE), seeded random weights."""
    kwargs: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return wrap_model(model, tokenizer, name=name)


def save_model_dir(family: str, root: Any, seed: int = 0) -> str:
    """Write the tiny model of `family` as a local model directory, for code that loads by path."""
    from pathlib import Path

    target = Path(root) / f"tiny-{family}-{seed}"
    if not (target / "config.json").is_file():
        loaded = make_model(family, seed)
        loaded.model.save_pretrained(target)
        loaded.tokenizer.save_pretrained(target)
    return str(target)


# Architectures whose RoPE pairs dims (2i, 2i+1) (`rotate_half` on even/odd dims) instead of the two halves;
# not chat families (no templates of their own), built over the Llama tokenizer for the re-rotation tests.
INTERLEAVED_ROPE = {
    "cohere": ("CohereConfig", "CohereForCausalLM"),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM"),
    "glm": ("GlmConfig", "GlmForCausalLM"),
    "glm4": ("Glm4Config", "Glm4ForCausalLM"),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM"),
    "helium": ("HeliumConfig", "HeliumForCausalLM"),
}


def make_interleaved_rope_model(name: str, seed: int = 0, **overrides: Any) -> LoadedModel:
    """A 2-layer model of an interleaved-RoPE architecture (`INTERLEAVED_ROPE`), seeded random weights."""
    import transformers

    config_name, model_name = INTERLEAVED_ROPE[name]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    options = {"head_dim": 16, **overrides}  # hidden 64 over 4 heads (some configs default to 128)
    return tiny_model(config_cls, model_cls, make_tokenizer("llama"), f"tiny-{name}-{seed}", seed, **options)
