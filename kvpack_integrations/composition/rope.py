"""Re-rotating cached keys to a new position with the model's own rotary embedding.

A key cached at position p holds s * R(p) k (s: the RoPE variant's attention scaling). Rotations
compose, R(p + d) = R(d) R(p), so moving it to p + d needs only R(d), built from the same inverse
frequencies the model uses (llama3 and yarn scaling change them; linear scaling divides them) and
without applying s again. Values carry no position and stay as they are.

Two layouts pair the rotated dims: the two halves (dim i with i + rot_dim/2: Llama, Qwen, Mistral,
Gemma, Phi) and interleaved (dims 2i and 2i+1: Cohere, Cohere 2, GLM, GLM-4, Ernie 4.5, Helium). Which
one is read from the model's own `rotate_half` (`rotary_layout`); a model without one is refused, since
re-rotating in the wrong layout gives wrong keys without any error.

Refused with a clear error: RoPE variants whose frequencies depend on the sequence length (dynamic,
longrope), models with several rotary embeddings (Gemma 3's local/global layers) and models without
RoPE. Partial rotary (a `partial_rotary_factor` below 1, as in Phi-2) rotates only the first dims,
as the model does. Layers without RoPE (`no_rope_layers`: SmolLM3, Llama 4) keep their keys as they
are (`rerotate_layers`): their keys carry no position. Sliding-window layers are the caller's
concern: their caches cannot be composed past the window (`check_sliding_window`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from ..errors import CompositionError
from ..runtime.loader import LoadedModel

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# rotate_half(arange(4)) in each layout: halves pairs dim i with i + d/2, interleaved 2i with 2i+1
ROTATE_HALF_PROBES = {"halves": [-2.0, -3.0, 0.0, 1.0], "interleaved": [-1.0, 0.0, -3.0, 2.0]}


@dataclass(frozen=True)
class RopeSpec:
    """What re-rotation needs: the inverse frequencies (one per rotated pair) and the rotated width."""

    inv_freq: torch.Tensor  # [rot_dim // 2], float32
    rot_dim: int
    rope_type: str
    unrotated_layers: frozenset[int] = frozenset()  # layers whose attention applies no RoPE
    interleaved: bool = False  # pairs (2i, 2i+1) instead of (i, i + rot_dim/2)
    _on_device: dict[torch.device, torch.Tensor] = field(default_factory=dict, init=False, compare=False, repr=False)

    def frequencies(self, device: torch.device) -> torch.Tensor:
        """`inv_freq` in float64 on `device`, copied there once."""
        freqs = self._on_device.get(device)
        if freqs is None:
            freqs = self._on_device[device] = self.inv_freq.double().to(device)
        return freqs


def rope_spec(loaded: LoadedModel) -> RopeSpec:
    """The loaded model's RoPE, or a `CompositionError` saying why its keys cannot be re-rotated."""
    decoder = getattr(loaded.model, "model", loaded.model)
    if any(hasattr(decoder, name) for name in ("rotary_emb_local", "rotary_embs")):
        raise CompositionError(
            f"{loaded.name} uses several rotary embeddings (local and global layers): key re-rotation "
            "is not supported for it; use exact composition"
        )
    rotary = getattr(decoder, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    buffers = [n for n, _ in rotary.named_buffers()] if rotary is not None else []
    per_layer_type = [n for n in buffers if n.endswith("_inv_freq") and "original" not in n]
    if inv_freq is None and per_layer_type:  # transformers 5: Gemma 3's one module for local and global layers
        raise CompositionError(
            f"{loaded.name} uses several rotary embeddings ({', '.join(sorted(per_layer_type))}): key re-rotation "
            "is not supported for it; use exact composition"
        )
    if rotary is None or not isinstance(inv_freq, torch.Tensor):
        raise CompositionError(f"{loaded.name} has no rotary position embedding: its keys cannot be re-rotated")
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CompositionError(
            f"{loaded.name} uses RoPE type {rope_type!r}, whose frequencies depend on the sequence length; "
            f"re-rotation supports {', '.join(SUPPORTED_ROPE_TYPES)}; use exact composition"
        )
    rot_dim = 2 * int(inv_freq.numel())
    if rot_dim > loaded.fingerprint.head_dim:
        raise CompositionError(
            f"{loaded.name}: rotary width {rot_dim} exceeds the head dim {loaded.fingerprint.head_dim}"
        )
    interleaved = rotary_layout(loaded) == "interleaved"
    return RopeSpec(inv_freq.detach().float().cpu().clone(), rot_dim, rope_type, _unrotated_layers(loaded), interleaved)


def rotary_layout(loaded: LoadedModel) -> str:
    """`halves` or `interleaved`: how the model pairs its rotated dims, read from its own `rotate_half` run
    on [0, 1, 2, 3], since both layouts use the same RoPE type and config keys. A `CompositionError` when
    the modeling code has no `rotate_half` or it does something else: keys re-rotated in a guessed layout
    would be silently wrong."""
    decoder = getattr(loaded.model, "model", loaded.model)
    layers = getattr(decoder, "layers", None)
    attention = getattr(layers[0], "self_attn", None) if layers else None
    owners = [type(m).__module__ for m in (attention, loaded.model) if m is not None]
    rotate_half = next(
        (f for name in owners if callable(f := getattr(sys.modules.get(name), "rotate_half", None))), None
    )
    if rotate_half is None:
        raise CompositionError(
            f"{loaded.name}: its modeling code ({owners[0]}) has no rotate_half, so how it pairs the rotary "
            "dimensions is unknown: key re-rotation is not supported for it; use exact composition"
        )
    try:
        with torch.no_grad():
            probe = [float(x) for x in rotate_half(torch.arange(4.0)).reshape(-1).tolist()]
    except Exception as exc:  # modeling code of any shape: whatever it raises means "layout unknown"
        raise CompositionError(
            f"{loaded.name}: its rotate_half cannot be probed ({exc}): key re-rotation is not supported for it; "
            "use exact composition"
        ) from exc
    for layout, expected in ROTATE_HALF_PROBES.items():
        if probe == expected:
            return layout
    raise CompositionError(
        f"{loaded.name}: its rotate_half maps [0, 1, 2, 3] to {probe}, neither the two-halves nor the "
        "interleaved RoPE layout: key re-rotation is not supported for it; use exact composition"
    )


def _unrotated_layers(loaded: LoadedModel) -> frozenset[int]:
    """Layers the config marks as using no RoPE: `no_rope_layers[i]` is 1 where layer i does use it
    (transformers' SmolLM3, Llama 4 and Mistral Large 3 read it so)."""
    flags = getattr(loaded.model.config, "no_rope_layers", None)
    if flags is None:
        return frozenset()
    if len(flags) != loaded.fingerprint.num_layers:
        raise CompositionError(
            f"{loaded.name}: no_rope_layers has {len(flags)} entries for {loaded.fingerprint.num_layers} layers"
        )
    return frozenset(i for i, uses_rope in enumerate(flags) if not uses_rope)


def _cos_sin(delta: int | torch.Tensor, spec: RopeSpec, seq: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin of the rotation angles [1 or seq, rot_dim // 2], float32, computed on `device` in float64
    (exact for positions past 2**24). On a GPU nothing is copied from the host, so composing many packets
    never waits for the device between them."""
    if isinstance(delta, torch.Tensor):
        shift = delta.to(device=device, dtype=torch.float64).reshape(-1)
    else:
        shift = torch.full((1,), float(delta), dtype=torch.float64, device=device)
    if shift.numel() not in (1, seq):
        raise CompositionError(f"{shift.numel()} position shifts for {seq} cached positions")
    # One shift for all: one row of angles, broadcast over every position (and every leading dim, e.g. all
    # layers at once), not one row per position.
    angles = shift[:, None] * spec.frequencies(device)[None, :]
    return angles.cos().float(), angles.sin().float()


def rerotate(
    keys: torch.Tensor, delta: int | torch.Tensor, spec: RopeSpec, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Keys [..., seq, head_dim] moved by `delta` positions (an int, or one per position), into `out` (a
    new tensor by default; a slice of a composed cache saves a copy). In float32, rounded once to the
    keys' dtype. With (x1, x2) the rotated pairs (the two halves of the rotated width, or its even and odd
    dims when `spec.interleaved`): (x1 cos - x2 sin, x2 cos + x1 sin)."""
    if out is not None and out.untyped_storage().data_ptr() == keys.untyped_storage().data_ptr():
        raise CompositionError("rerotate writes the second half from the first: `out` must not share the keys' memory")
    cos, sin = _cos_sin(delta, spec, keys.shape[-2], keys.device)
    half, rot = spec.rot_dim // 2, spec.rot_dim
    out = torch.empty_like(keys) if out is None else out
    first, second = (slice(0, rot, 2), slice(1, rot, 2)) if spec.interleaved else (slice(0, half), slice(half, rot))
    x1, x2 = keys[..., first].float(), keys[..., second].float()
    out[..., first] = x1 * cos - x2 * sin
    out[..., second] = x2 * cos + x1 * sin
    if rot < keys.shape[-1]:
        out[..., rot:] = keys[..., rot:]
    return out


def rerotate_layers(
    keys: torch.Tensor, delta: int | torch.Tensor, spec: RopeSpec, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Keys of every layer [layers, ..., seq, head_dim] moved by `delta`, except layers without RoPE."""
    moved = rerotate(keys, delta, spec, out)
    for layer in spec.unrotated_layers:
        moved[layer] = keys[layer]
    return moved
