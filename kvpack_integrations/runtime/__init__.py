"""Layer 1: model runtime (loading, device/dtype, fingerprints)."""

from .default_model import DEFAULT_MODEL_NAME, default_gguf_path, default_model_dir, kvpack_home
from .device import dtype_name, resolve_device, resolve_dtype
from .fingerprint import Fingerprint, fingerprint_model
from .loader import LoadedModel, load_model, wrap_model

__all__ = [
    "DEFAULT_MODEL_NAME",
    "Fingerprint",
    "LoadedModel",
    "default_gguf_path",
    "default_model_dir",
    "dtype_name",
    "fingerprint_model",
    "kvpack_home",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "wrap_model",
]
