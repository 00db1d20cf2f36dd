"""Value-space steering: contrastive V-deltas added to a composed cache's values, keys untouched."""

from .build import build_steering_vector, load_pairs
from .vector import SteeringVector, resolve_layers

__all__ = ["SteeringVector", "build_steering_vector", "load_pairs", "resolve_layers"]
