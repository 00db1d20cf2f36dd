"""`PacketAdapter`: the trained header and trailer soft tokens that wrap every cached document.

Why: a document cached at position 0 on its own never saw the text that will precede it, and the
question's tokens never attended to it while it was computed. The header gives every document the
same learned start (standing in for the missing context, as an attention sink), the trailer a learned
summary place the question can read from. They live in the input-embedding space, `header_tokens`
(default 8) + `trailer_tokens` (default 8) vectors of the model's hidden size, and are the only
trained parameters; one pair per model, saved as safetensors with the model fingerprint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FingerprintMismatchError, InvalidInputError
from ..runtime.fingerprint import Fingerprint
from ..runtime.loader import LoadedModel
from ..segments.tensor_files import load_tensor_file, save_tensor_file

FORMAT = "kvpack-packet-adapter/1"


@dataclass
class PacketAdapter:
    header: torch.Tensor  # [header_tokens, hidden]
    trailer: torch.Tensor  # [trailer_tokens, hidden]
    fingerprint: Fingerprint
    trained_steps: int = 0
    notes: str = ""

    def __post_init__(self) -> None:
        if self.header.ndim != 2 or self.trailer.ndim != 2 or self.header.shape[1] != self.trailer.shape[1]:
            raise InvalidInputError(
                f"header {tuple(self.header.shape)} and trailer {tuple(self.trailer.shape)} must be [tokens, hidden]"
            )
        if not (torch.isfinite(self.header).all() and torch.isfinite(self.trailer).all()):
            raise InvalidInputError("the packet adapter holds NaN or infinite values")

    @classmethod
    def initial(
        cls, loaded: LoadedModel, header_tokens: int = 8, trailer_tokens: int = 8, seed: int = 0
    ) -> PacketAdapter:
        """Untrained soft tokens: random mixtures of real token embeddings, so they start in-distribution."""
        if header_tokens < 1 or trailer_tokens < 1:
            raise InvalidInputError("a packet adapter needs at least one header and one trailer token")
        table = loaded.model.get_input_embeddings().weight.detach().float().cpu()
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(0, table.shape[0], (header_tokens + trailer_tokens, 4), generator=generator)
        soft = table[picks].mean(dim=1)
        return cls(soft[:header_tokens].clone(), soft[header_tokens:].clone(), loaded.fingerprint)

    @property
    def header_tokens(self) -> int:
        return int(self.header.shape[0])

    @property
    def trailer_tokens(self) -> int:
        return int(self.trailer.shape[0])

    def check_model(self, loaded: LoadedModel) -> None:
        if self.fingerprint != loaded.fingerprint:
            raise FingerprintMismatchError(
                "the packet adapter was trained for another model: "
                + "; ".join(loaded.fingerprint.mismatches(self.fingerprint))
            )
        hidden = loaded.model.get_input_embeddings().weight.shape[1]
        if self.header.shape[1] != hidden:
            raise InvalidInputError(f"the adapter's soft tokens have width {self.header.shape[1]}, the model {hidden}")

    def digest(self) -> str:
        """A short digest of the soft tokens, naming the packets wrapped in them (a retrained adapter gets
        new packets). Computed afresh (a third of a millisecond at hidden 4096): callers that name many
        packets compute it once per query (`PacketComposer`), never a cached value that a write through
        `.data` or a shared numpy array would leave stale."""
        raw = b"".join(t.detach().float().cpu().numpy().tobytes() for t in (self.header, self.trailer))
        return hashlib.sha256(raw).hexdigest()[:12]

    def save(self, path: str | Path) -> Path:
        meta = {"trained_steps": str(self.trained_steps), "notes": self.notes}
        tensors = {"header": self.header, "trailer": self.trailer}
        return save_tensor_file(path, tensors, file_format=FORMAT, fingerprint=self.fingerprint, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, expected: Fingerprint | None = None) -> PacketAdapter:
        tensors, meta, fingerprint = load_tensor_file(
            path, file_format=FORMAT, what="packet adapter", expected=expected
        )
        if {"header", "trailer"} - tensors.keys():
            raise InvalidInputError(f"{path} lacks the header or trailer tensor")
        raw = meta.get("trained_steps", "0")
        try:
            steps = int(raw)
        except ValueError:
            steps = -1
        if steps < 0:  # an edited or foreign file: named, not a bare ValueError from int()
            raise InvalidInputError(f"{path}: trained_steps {raw!r} is not a whole number of steps >= 0")
        return cls(tensors["header"], tensors["trailer"], fingerprint, steps, meta.get("notes", ""))


SHIPPED = Path(__file__).resolve().parent / "adapters"


def shipped_adapter(loaded: LoadedModel) -> Path | None:
    """The adapter trained for this model and shipped in the package, if there is one."""
    path = SHIPPED / f"{loaded.fingerprint.digest}.safetensors"
    return path if path.is_file() else None
