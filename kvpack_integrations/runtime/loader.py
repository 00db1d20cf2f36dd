"""Load a causal LM + tokenizer from a hub id, a local directory, a GGUF file, or the embedded default."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError, KVPackError, ModelLoadError
from .default_model import DEFAULT_MODEL_NAME, convert_again, converted_dir, default_gguf_path, ensure_converted
from .device import dtype_name, resolve_device, resolve_dtype
from .fingerprint import Fingerprint, fingerprint_model


@dataclass
class LoadedModel:
    """A model, its tokenizer and the facts about them that cache handling needs."""

    model: Any
    tokenizer: Any
    name: str
    fingerprint: Fingerprint
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # LongRoPE swaps the model's shared frequency buffer on every forward: its forwards run one at a time
    forward_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def config(self) -> Any:
        return self.model.config.get_text_config(decoder=True)

    @property
    def numerics(self) -> str:
        """Where and how this model's K/V are computed (`cpu/sdpa`, `cuda/flash_attention_2`,
        `cuda/sdpa/fp32-matmul-high`): the same weights on another device or attention kernel, or fp32
        matmuls at reduced precision (TF32 on CUDA, bf16 passes on CPUs that have them), give K/V that
        differ by rounding, so a cache computed under other numerics is not exact here. Read at each use:
        the matmul precision is a process-wide switch."""
        kernel = getattr(self.model.config, "_attn_implementation", None) or "eager"
        parts = [self.device.type, str(kernel)]
        precision = torch.get_float32_matmul_precision()  # set_float32_matmul_precision and allow_tf32 alike
        if self.model.dtype == torch.float32 and precision != "highest":
            parts.append(f"fp32-matmul-{precision}")
        return "/".join(parts)

    @property
    def context_window(self) -> int:
        """Positions the model was trained for (`max_position_embeddings`)."""
        return int(getattr(self.config, "max_position_embeddings", 0) or 2048)

    @property
    def sliding_window(self) -> int | None:
        """Smallest sliding window among the layers, if any layer slides."""
        types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if window is None:
            return None
        if types is not None and "sliding_attention" not in types:
            return None
        return int(window)

    @functools.cached_property
    def rope_regime_limit(self) -> int | None:
        """Longest forward pass whose RoPE frequencies do not depend on its length, if they ever do.

        LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) picks short factors while a forward's last position is
        within `original_max_position_embeddings` and long ones past it, for every key of that forward:
        a prompt past it is rotated unlike any cached prefix computed in a shorter forward."""
        params = getattr(self.config, "rope_parameters", None) or getattr(self.config, "rope_scaling", None) or {}
        entries = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
        fallback = getattr(self.config, "original_max_position_embeddings", None)
        limits = [
            int(e.get("original_max_position_embeddings") or fallback or 0)
            for e in entries
            if isinstance(e, dict) and (e.get("rope_type") or e.get("type")) == "longrope"
        ]
        positive = [limit for limit in limits if limit > 0]
        return min(positive) if positive else None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a turn: generation config's eos plus the tokenizer's."""
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(i) for i in eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)


_CACHE: dict[tuple[str, str, str], LoadedModel] = {}
_LOCK = threading.Lock()


def wrap_model(model: Any, tokenizer: Any, name: str | None = None) -> LoadedModel:
    """Wrap an already-loaded model and tokenizer (tests, custom loading code)."""
    model.eval()
    device = next(model.parameters()).device
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name or getattr(model.config, "name_or_path", "") or type(model).__name__,
        fingerprint=fingerprint_model(model, tokenizer),
        device=device,
    )


def _converted(gguf: Path) -> Path:
    """The safetensors copy of `gguf`, converting it on first use; a file the GGUF reader refuses is named."""
    try:
        return ensure_converted(gguf)
    except KVPackError:
        raise
    except Exception as exc:  # gguf/transformers raise many types for a bad file
        raise ModelLoadError(f"could not read GGUF file {gguf}: {exc}") from exc


def _classify_source(source: str | Path | None) -> tuple[str, Path | str, str]:
    """What the user gave, as (kind, where, display name): kind "gguf" (a GGUF file, the default model's
    included), "directory" (a model folder) or "hub" (an id the user's cache or network resolves). One
    reading for loading and for looking at the config without loading; a path that cannot be a model is
    refused by name."""
    if source is None or str(source) in ("", "default", DEFAULT_MODEL_NAME):
        return "gguf", default_gguf_path(), DEFAULT_MODEL_NAME
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return "gguf", path.resolve(), path.stem
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        return "directory", path, path.name
    if str(source).startswith((".", "/", "~")):
        raise ModelLoadError(f"model path does not exist: {source}")
    return "hub", str(source), str(source)


def _resolve_source(source: str | Path | None) -> tuple[str, dict[str, Any], str, Path | None]:
    """Map what the user gave to (path or id, from_pretrained kwargs, display name, and the GGUF file when
    the path is our converted copy of it), converting a GGUF file on first use."""
    kind, where, name = _classify_source(source)
    if kind == "gguf":
        gguf = Path(where)
        return str(_converted(gguf)), {"local_files_only": True}, name, gguf
    if kind == "directory":
        return str(where), {"local_files_only": True}, name, None
    return str(where), {}, name, None  # a hub id: the user's own cache or network decides


def config_source(source: str | Path | None) -> str | None:
    """Where `load_model(source)` reads its config, without loading or converting anything: a model
    directory, our converted copy of a GGUF file, or a hub id; None where there is none yet (a GGUF file not
    converted) or the source does not load (loading names why)."""
    try:
        kind, where, _ = _classify_source(source)
    except (KVPackError, OSError):
        return None
    if kind == "hub":
        return str(where)
    path = converted_dir(Path(where)) if kind == "gguf" else Path(where)
    return str(path) if (path / "config.json").is_file() else None


def _one_device(dev: torch.device) -> torch.device:
    """`cuda` and `cuda:<current>` (or `cpu` and `cpu:0`) are one device: one cache key, one load."""
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cpu":
        return torch.device("cpu")
    return dev


def _read(where: str, kwargs: dict[str, Any], dt: torch.dtype) -> tuple[Any, Any]:
    """Tokenizer and model from `where`, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dt, **kwargs)
    return tokenizer, model


def _read_converted(gguf: Path, where: str, kwargs: dict[str, Any], dt: torch.dtype) -> tuple[Any, Any]:
    """Read our converted copy of `gguf`; one that fails (cut short by a crash or a full disk, damaged) is
    converted again from the GGUF file, the source of truth, instead of failing every later load."""
    try:
        return _read(where, kwargs, dt)
    except MemoryError:
        raise
    except Exception:  # safetensors, tokenizers and json raise their own types for a bad file
        try:
            convert_again(gguf, Path(where))
        except KVPackError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"could not read GGUF file {gguf}: {exc}") from exc
        try:
            return _read(where, kwargs, dt)
        except Exception as exc:
            raise ModelLoadError(
                f"the converted copy {where} of {gguf} does not load even when converted again: {exc}; "
                "delete that folder and report the problem"
            ) from exc


def _checked_dtype(dtype: object) -> str | torch.dtype | None:
    """A dtype as `resolve_dtype` takes it; anything else (a number, a NumPy dtype) is refused by name."""
    if dtype is None or isinstance(dtype, (str, torch.dtype)):
        return dtype
    raise InvalidInputError(f"dtype must be a name such as 'float32', a torch.dtype or None, got {dtype!r}")


def load_model(
    source: str | Path | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = "auto",
) -> LoadedModel:
    """Load (once per process) a causal LM and its tokenizer; `None` means the embedded default."""
    dt_asked = _checked_dtype(dtype)
    where, kwargs, name, gguf = _resolve_source(source)
    dev = _one_device(resolve_device(device))
    dt = resolve_dtype(dt_asked, dev)
    key = (where, str(dev), dtype_name(dt))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        try:
            tokenizer, model = _read(where, kwargs, dt) if gguf is None else _read_converted(gguf, where, kwargs, dt)
            model = model.to(dev)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(f"could not load model {name!r} from {where}: {exc}") from exc
        loaded = wrap_model(model, tokenizer, name)
        loaded.device = dev
        _CACHE[key] = loaded
        return loaded
