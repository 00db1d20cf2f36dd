"""Model fingerprints: every cache segment carries one, and a segment is used only where it matches.

A KV cache is a function of the weights, the configuration (RoPE base and scaling, norms, attention
scalings: the same checkpoint loaded with a long-context RoPE override computes other keys), the
tokenizer (ids), the chat template (which tokens surround the knowledge) and the compute dtype; the
fingerprint hashes exactly those, plus the shapes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .device import dtype_name

_SAMPLES_PER_TENSOR = 4096
NOT_RECORDED = "not recorded"  # files written before the configuration was hashed
# configuration keys that cannot change a cache: bookkeeping, generation defaults, token ids, initialisation
_CONFIG_KEYS_IGNORED = frozenset(
    {
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "attn_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "initializer_range",
        "id2label",
        "label2id",
        "problem_type",
        "task_specific_params",
        "tokenizer_class",
        "chunk_size_feed_forward",
        "tie_word_embeddings",
    }
)


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a loaded model as far as its KV caches are concerned."""

    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    weights_hash: str
    tokenizer_hash: str
    dtype: str
    config_hash: str = NOT_RECORDED

    @property
    def digest(self) -> str:
        """Short id of the whole fingerprint (used in file names and messages)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        data: dict[str, Any] = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("fingerprint is not a JSON object")
        names = {f.name for f in fields(cls)}
        data = {"config_hash": NOT_RECORDED, **data}  # written before the configuration was hashed: a mismatch
        missing = names - data.keys()
        if missing:
            raise ValueError(f"fingerprint lacks fields {sorted(missing)}")
        return cls(**{k: data[k] for k in names})

    def mismatches(self, other: Fingerprint) -> list[str]:
        """Human-readable list of the fields that differ (`field: ours != theirs`)."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name}: {theirs} (pack) != {mine} (loaded model)")
        return out


def hash_weights(model: torch.nn.Module) -> str:
    """Hash every parameter's name, shape and dtype plus a strided sample of its values.

    Sampling keeps this well under a second for multi-GB models while any fine-tune, merge or
    different checkpoint (which changes essentially every tensor) still gets a different hash.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(tensor.shape)}|{dtype_name(tensor.dtype)}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def hash_config(config: Any) -> str:
    """Hash the text configuration but for the keys that cannot change a cache (`_CONFIG_KEYS_IGNORED`,
    private ones): RoPE base and scaling, norm epsilons, softcaps, windows and the like all count."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kept = {k: v for k, v in text.to_dict().items() if k not in _CONFIG_KEYS_IGNORED and not k.startswith("_")}
    return hashlib.blake2b(json.dumps(kept, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def hash_tokenizer(tokenizer: Any) -> str:
    """Hash the vocabulary (ids), added/special tokens and the chat template text."""
    h = hashlib.blake2b(digest_size=16)
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode())
    h.update(json.dumps(sorted(str(t) for t in tokenizer.all_special_tokens)).encode())
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    h.update(template.encode())
    return h.hexdigest()


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) from a text config; heterogeneous models are checked at build time."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def fingerprint_model(model: Any, tokenizer: Any) -> Fingerprint:
    """Compute the fingerprint of a loaded model + tokenizer pair."""
    layers, kv_heads, head_dim = kv_shape(model.config)
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return Fingerprint(
        architecture=f"{model.config.model_type}/{archs[0]}",
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(model.get_input_embeddings().weight.shape[0]),
        weights_hash=hash_weights(model),
        tokenizer_hash=hash_tokenizer(tokenizer),
        dtype=dtype_name(model.dtype),
        config_hash=hash_config(model.config),
    )
