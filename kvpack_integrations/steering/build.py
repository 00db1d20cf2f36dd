"""Building a steering vector from contrastive pairs: mean V(positive) - mean V(negative), per layer.

Each text is rendered with the model's chat template as an assistant turn (the role whose style we
steer; after a fixed user turn where the template insists on one), run once, and its values are
averaged over the text's own tokens (the template's tokens are left out: they are the same on both
sides). Rows of a pairs file are `{"positive": ..., "negative": ...}`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..composition.cache_ops import check_sliding_window, empty_cache
from ..errors import CompositionError, InvalidInputError, TemplateError
from ..prompts.rendering import render_messages
from ..runtime.cache_keyword import with_cache
from ..runtime.loader import LoadedModel
from ..runtime.paths import read_text_lines
from .vector import SteeringVector, check_alpha, resolve_layers


def load_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Read `{positive, negative}` JSONL rows, naming the line of a malformed one."""
    path = Path(path)
    pairs = []
    for no, line in enumerate(read_text_lines(path, "pairs file"), 1):  # missing or non-UTF-8: named
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pos, neg = row["positive"], row["negative"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{path}:{no}: expected {{positive, negative}} ({exc})") from None
        if not isinstance(pos, str) or not isinstance(neg, str) or not pos.strip() or not neg.strip():
            raise InvalidInputError(f"{path}:{no}: positive and negative must be non-empty strings")
        pairs.append((pos, neg))
    if not pairs:
        raise InvalidInputError(f"{path} holds no pairs")
    return pairs


# the user turn templates that insist on user/assistant alternation (Mistral, Gemma) get before the text;
# the same on both sides of every pair, so it cancels out of the difference
_OPENING = "Reply."


def mean_values(loaded: LoadedModel, text: str) -> torch.Tensor:
    """Values of `text` as an assistant turn, averaged over its tokens: [num_layers, kv_heads, head_dim]."""
    turn = {"role": "assistant", "content": text}
    try:
        rendered = render_messages(loaded.tokenizer, [turn], add_generation_prompt=False)
        index = 0
    except TemplateError:  # the template wants a user turn first
        opening = {"role": "user", "content": _OPENING}
        rendered = render_messages(loaded.tokenizer, [opening, turn], add_generation_prompt=False)
        index = 1
    lo, hi = rendered.part(index).tokens
    if hi <= lo:
        raise InvalidInputError(f"the text {text[:40]!r} renders to no tokens")
    what = f"the steering text {text[:40]!r} in its turn"
    check_sliding_window(loaded, len(rendered.token_ids), what, "use shorter steering texts", InvalidInputError)
    cache = empty_cache(loaded)
    ids = torch.tensor([list(rendered.token_ids)], dtype=torch.long, device=loaded.device)
    with torch.no_grad():
        loaded.model(input_ids=ids, **with_cache(loaded.model, cache), use_cache=True, logits_to_keep=1)
    means = []
    for index, layer in enumerate(cache.layers):
        values = getattr(layer, "values", None)
        if values is None:
            raise CompositionError(f"layer {index} ({type(layer).__name__}) keeps no values: it cannot be steered")
        means.append(values[0, :, lo:hi].float().mean(dim=1).cpu())
    return torch.stack(means)


def build_steering_vector(
    loaded: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    *,
    layers: str | Sequence[int] | tuple[float, float] = "mid",
    alpha: float = 1.0,
    name: str = "steering",
    progress: bool = True,
) -> SteeringVector:
    """Mean over pairs of (mean V(positive) - mean V(negative)) at every layer; `layers` says which apply."""
    if not pairs:
        raise InvalidInputError("a steering vector needs at least one (positive, negative) pair")
    fp = loaded.fingerprint
    chosen, strength = resolve_layers(layers, fp.num_layers), check_alpha(alpha)  # before the pairs run, not after
    total = torch.zeros(fp.num_layers, fp.num_kv_heads, fp.head_dim)
    for pos, neg in tqdm(pairs, desc=f"steering vector {name}", unit="pair", disable=not progress):
        total += mean_values(loaded, pos) - mean_values(loaded, neg)
    return SteeringVector(deltas=total / len(pairs), layers=chosen, alpha=strength, fingerprint=fp, name=name)
