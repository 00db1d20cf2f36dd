"""`SteeringVector`: per-layer value deltas [kv_heads, head_dim], a layer range and a strength.

Why values and not keys: keys carry RoPE rotations, so adding a position-free delta to them breaks
the positional code; values are position-free, and a delta there shifts what every later token reads
from the steered positions. Vectors add (`a + b`), scale (`2 * a`), compare per layer (`a.cosine(b)`)
and are saved as safetensors with the model fingerprint, so one built for another model is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import FingerprintMismatchError, InvalidInputError
from ..runtime.fingerprint import Fingerprint
from ..segments.tensor_files import load_tensor_file, save_tensor_file

FORMAT = "kvpack-steering/1"
LAYER_NAMES = ("early", "mid", "late", "all")
_THIRDS = {"early": (0.0, 1 / 3), "mid": (1 / 3, 2 / 3), "late": (2 / 3, 1.0), "all": (0.0, 1.0)}


def _is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_layers(spec: str | Sequence[int] | tuple[float, float]) -> tuple[float, float] | tuple[int, ...]:
    """The layer spec checked without a model (before one loads): a fraction range `(lo, hi)` (names
    become their third) or layer indices >= 0; `resolve_layers` then fits it to a model."""
    if isinstance(spec, str):
        if spec in _THIRDS:
            return _THIRDS[spec]
        try:
            lo, hi = (float(x) for x in spec.split("-"))
        except ValueError:
            raise InvalidInputError(
                f"unknown layer range {spec!r}: use {', '.join(LAYER_NAMES)}, fractions like '0.3-0.7', or indices"
            ) from None
        spec = (lo, hi)
    items = list(spec)
    if len(items) == 2 and any(isinstance(x, float) for x in items):
        lo, hi = float(items[0]), float(items[1])
        if not 0.0 <= lo < hi <= 1.0:
            raise InvalidInputError(f"a layer fraction range needs 0 <= start < end <= 1, got ({lo}, {hi})")
        return lo, hi
    if not items or not all(_is_index(x) for x in items):
        raise InvalidInputError(f"layers must be a name, a fraction range or a non-empty list of indices, got {spec!r}")
    negative = [x for x in items if x < 0]
    if negative:
        raise InvalidInputError(f"layers {negative} are negative: layer indices start at 0")
    return tuple(int(x) for x in items)


def resolve_layers(spec: str | Sequence[int] | tuple[float, float], num_layers: int) -> tuple[int, ...]:
    """Layers from a name (`early`/`mid`/`late` thirds of depth, `all`), a fraction range `(0.3, 0.7)` or
    `"0.3-0.7"`, or explicit layer indices."""
    parsed = parse_layers(spec)
    if not all(_is_index(x) for x in parsed):
        lo, hi = parsed
        # at least one layer: a narrow range near the top (0.95-1.0 of 4 layers) is the last layer
        first = min(round(lo * num_layers), num_layers - 1)
        last = max(round(hi * num_layers), first + 1)
        return tuple(range(first, min(last, num_layers)))
    bad = [x for x in parsed if x >= num_layers]
    if bad:
        raise InvalidInputError(f"layers {bad} are outside this model's {num_layers} layers")
    return tuple(sorted({int(x) for x in parsed}))


def check_alpha(alpha: object) -> float:
    """A steering strength: a finite number (NaN or infinity would silently wreck every value it touches)."""
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidInputError(f"alpha must be a finite number, got {alpha!r}")
    return float(alpha)


@dataclass(frozen=True)
class SteeringVector:
    """`deltas[l]` is the mean V(positive) - V(negative) at layer l; only `layers` are applied, times `alpha`."""

    deltas: torch.Tensor  # [num_layers, kv_heads, head_dim], float32, unscaled
    layers: tuple[int, ...]
    alpha: float
    fingerprint: Fingerprint
    name: str = "steering"

    def __post_init__(self) -> None:
        fp = self.fingerprint
        shape = (fp.num_layers, fp.num_kv_heads, fp.head_dim)
        if tuple(self.deltas.shape) != shape:
            raise InvalidInputError(f"steering deltas have shape {tuple(self.deltas.shape)}, the model needs {shape}")
        if not torch.isfinite(self.deltas).all():
            raise InvalidInputError(f"steering vector {self.name!r} holds NaN or infinite values")
        check_alpha(self.alpha)
        if not all(_is_index(layer) for layer in self.layers):
            raise InvalidInputError(f"layers {self.layers} must be whole layer indices")
        if not self.layers or any(not 0 <= layer < fp.num_layers for layer in self.layers):
            raise InvalidInputError(f"layers {self.layers} are empty or outside the model's {fp.num_layers} layers")

    @property
    def digest(self) -> str:
        """Short id of what the vector does (deltas, layers, model; not alpha): caches key on it."""
        h = hashlib.blake2b(digest_size=8)
        h.update(self.deltas.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(f"{self.layers}|{self.fingerprint.digest}".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        """Names what the vector does by its digest: LangChain's cache keys a call's `steering=` by its repr,
        and the default one summarised the deltas, so two vectors differing past the summary shared a key."""
        return f"SteeringVector(name={self.name!r}, alpha={self.alpha:g}, layers={self.layers}, digest={self.digest})"

    # -- variants ----------------------------------------------------------------------------------

    def with_alpha(self, alpha: float) -> SteeringVector:
        return replace(self, alpha=float(alpha))

    def with_layers(self, spec: str | Sequence[int] | tuple[float, float]) -> SteeringVector:
        return replace(self, layers=resolve_layers(spec, self.fingerprint.num_layers))

    def effective(self) -> torch.Tensor:
        """What is added to the values: alpha * deltas on the chosen layers, zero elsewhere."""
        mask = torch.zeros(self.fingerprint.num_layers, 1, 1)
        mask[list(self.layers)] = 1.0
        return self.alpha * mask * self.deltas

    def __add__(self, other: SteeringVector) -> SteeringVector:
        """Composition: the sum of both effective deltas, on the union of their layers, alpha 1."""
        if not isinstance(other, SteeringVector):
            return NotImplemented
        _check_same_model(self, other)
        return SteeringVector(
            deltas=self.effective() + other.effective(),
            layers=tuple(sorted(set(self.layers) | set(other.layers))),
            alpha=1.0,
            fingerprint=self.fingerprint,
            name=f"{self.name}+{other.name}",
        )

    def __mul__(self, factor: float) -> SteeringVector:
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return self.with_alpha(self.alpha * factor)

    __rmul__ = __mul__

    def cosine(self, other: SteeringVector) -> torch.Tensor:
        """Cosine similarity of the raw deltas, one value per layer."""
        _check_same_model(self, other)
        a, b = self.deltas.flatten(1), other.deltas.flatten(1)
        return torch.nn.functional.cosine_similarity(a, b, dim=1)

    # -- files -------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        meta = {"layers": json.dumps(list(self.layers)), "alpha": repr(float(self.alpha)), "name": self.name}
        return save_tensor_file(
            path, {"deltas": self.deltas}, file_format=FORMAT, fingerprint=self.fingerprint, metadata=meta
        )

    @classmethod
    def load(cls, path: str | Path, expected: Fingerprint | None = None) -> SteeringVector:
        """Read a saved vector; with `expected`, one built for another model is a clear error."""
        tensors, meta, fingerprint = load_tensor_file(
            path, file_format=FORMAT, what="steering vector", expected=expected
        )
        if "deltas" not in tensors:
            raise InvalidInputError(f"{path} holds no steering deltas")
        try:  # a damaged or hand-edited file: named, not a JSON or type error from deep inside
            layers = json.loads(meta.get("layers", "[]"))
            if not isinstance(layers, list):
                raise ValueError(f"layers {layers!r} is not a list")
            alpha = float(meta.get("alpha", "1.0"))
            return cls(tensors["deltas"].float(), tuple(layers), alpha, fingerprint, meta.get("name", "steering"))
        except (ValueError, TypeError, InvalidInputError) as exc:
            raise InvalidInputError(f"{path} is a damaged steering vector file: {exc}") from None


def _check_same_model(a: SteeringVector, b: SteeringVector) -> None:
    if a.fingerprint != b.fingerprint:
        raise FingerprintMismatchError(f"steering vectors {a.name!r} and {b.name!r} were built for different models")


def combined(vectors: Iterable[SteeringVector], fingerprint: Fingerprint) -> torch.Tensor | None:
    """The summed effective deltas of `vectors` for a model, or None when there are none."""
    total: torch.Tensor | None = None
    for vec in vectors:
        if vec.fingerprint != fingerprint:
            raise FingerprintMismatchError(
                f"steering vector {vec.name!r} was built for another model: "
                + "; ".join(fingerprint.mismatches(vec.fingerprint))
            )
        total = vec.effective() if total is None else total + vec.effective()
    return total
