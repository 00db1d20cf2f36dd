"""Schema-guided JSON decoding: the engine writes the structure, the model only chooses values.

A 135M model cannot be trusted to close a brace, so braces, keys, commas and quotes are literal text
fed through the model (it still sees well-formed JSON in its context), and values are decoded under
token masks built once per tokenizer: strings may not contain `"`, `\\`, control characters or special
tokens; numbers are digits with an optional minus and (for `number`) one dot. Choices between literal
alternatives (`true`/`false`, enum members, `}` versus the next key, `]` versus `, `, union branches)
walk the alternatives' token sequences one token at a time, so options sharing a prefix are handled
exactly, and sampling settings (temperature, top-k, top-p, seed) apply to every decision.

Choices documented here because callers rely on them:

* Object properties come in schema order (but see unions below). Required ones are always written;
  for an optional one the model chooses between writing it, skipping ahead to a later property, or
  closing the object.
* When the token budget runs out the output is still completed so that it parses and validates: text
  from then on is appended without being fed to the model, optional parts are left out, and required
  values get the smallest valid filler (`""`, `0`, `false`, the first enum member, `[]`, a minimal
  object). `finish_reason` is then "length". A string runs until the model closes it or the budget
  ends (`max_string_tokens` caps it, between characters; a string cut there also gives "length"). A
  multi-byte character the budget cuts is left out of the string, which ends at its last whole character.
* `{}` (or `true`) at the root, and `{"type": "object"}` without properties, is a free-form object
  with at most 8 keys chosen by the model; nested `{}` is any primitive or such an object.
* Recursive `$ref`s are rejected up front (`check_schema`); so are remote refs and unknown types.
* `allOf` parts, `$ref` siblings and keywords beside `anyOf`/`oneOf` (merged into every branch) are
  intersected: a property named in both schemas is held to both, types meet, `required` lists unite.
  In a union of objects, each branch's required `const`/`enum` properties (its discriminator) are
  written first.
* Not enforced: string `minLength`/`maxLength`/`pattern`/`format`, numeric bounds beyond "no minus
  sign when `minimum` >= 0", `multipleOf`, `uniqueItems`, `oneOf` exclusivity (treated as `anyOf`),
  `not`, `if`/`then`/`else`, `contains`, `propertyNames`, `patternProperties`, `minProperties`/
  `maxProperties`, `dependentRequired`/`dependentSchemas`.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..composition.cache_ops import forward
from ..errors import InvalidInputError
from .engine import Engine, Prefilled
from .sampling import make_generator, next_token
from .settings import GenerationSettings
from .usage import Usage

TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
MAX_FREE_KEYS = 8
MAX_ARRAY_ITEMS = 8
MAX_NUMBER_TOKENS = 16
MAX_EXPANDED_ALTERNATIVES = 64
_ANNOTATIONS = ("title", "description", "default", "examples", "$comment", "$schema", "$id")
_CLOSE = object()  # the "close this container" outcome of a choice


@dataclass
class GuidedResult:
    """A guided generation: the JSON text, its parsed value, the ids fed after the prompt, and usage."""

    text: str
    value: Any
    token_ids: list[int]
    usage: Usage
    finish_reason: str
    strings_cut: int = 0  # string values cut at `max_string_tokens` (each makes finish_reason "length")
    complete: bool = True  # False: the budget ran out before the model made every choice (values are fillers)


# --- vocabulary classes -------------------------------------------------------------------------------


@dataclass
class _Vocab:
    """Per-tokenizer token texts and masks; built once, since decoding a 50k vocabulary takes a moment."""

    pieces: list[str | None]  # a token's text in the middle of a string; None: special or not clean text
    specials: dict[int, str]  # special and added tokens' texts: literals may contain them, values may not
    masks: dict[str, torch.Tensor]
    piece_to_id: dict[str, int]
    max_piece: int
    encoded: dict[str, list[int]] = field(default_factory=dict)
    partial_bytes: dict[int, bytes] = field(default_factory=dict)  # the raw bytes of byte-piece tokens, if known
    continuations: dict[bytes, torch.Tensor] = field(default_factory=dict)  # per unfinished character's bytes


_VOCABS: dict[tuple[str, int, int, str], _Vocab] = {}

_CLASSES: dict[str, Callable[[str], bool]] = {
    "string": lambda p: not any(c in '"\\' or ord(c) < 0x20 or c == "\x7f" for c in p),
    "string_close": lambda p: p.startswith('"'),
    "minus": lambda p: p == "-",
    "zero": lambda p: p == "0",
    "int_start": lambda p: re.fullmatch(r"[1-9][0-9]*", p) is not None,
    "minus_int": lambda p: re.fullmatch(r"-(0|[1-9][0-9]*)", p) is not None,
    "digits": lambda p: re.fullmatch(r"[0-9]+", p) is not None,
    "dot": lambda p: p == ".",
    "dot_digits": lambda p: re.fullmatch(r"\.[0-9]+", p) is not None,
}


def _token_pieces(tokenizer: Any, size: int) -> tuple[list[str | None], dict[int, str], list[bool]]:
    """Each token's text mid-string (None for special and unclean ones), and the special tokens' texts.

    A token is decoded after an anchor token and the anchor's text dropped: decoded alone, a token
    loses its SentencePiece word-start space; after an anchor it reads as it would inside a value.
    """
    anchor_ids = tokenizer.encode("a", add_special_tokens=False) or [0]
    anchor = anchor_ids[-1]
    head = tokenizer.decode([anchor], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    usable = min(size, len(tokenizer))
    texts = tokenizer.batch_decode(
        [[anchor, i] for i in range(usable)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    banned = set(getattr(tokenizer, "all_special_ids", []) or [])
    banned.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    pieces: list[str | None] = [None] * size
    specials: dict[int, str] = {}
    partial: list[bool] = [False] * size
    for i, text in enumerate(texts):
        if not text.startswith(head):
            continue
        piece = text[len(head) :]
        if i in banned:
            specials[i] = piece
        elif piece and "\ufffd" not in piece:
            pieces[i] = piece
        elif piece and _CLASSES["string"](piece.replace("\ufffd", "")):
            partial[i] = True  # part of a multi-byte character (CJK, emoji): only valid with its neighbours
    return pieces, specials, partial


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2's): printable bytes stand for themselves, the rest are shifted
    past 255, so every byte has a visible character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


def _byte_pieces(tokenizer: Any, ids: Sequence[int], raw: Sequence[Any]) -> dict[int, bytes]:
    """Raw bytes of the byte-piece tokens, for byte-level BPE (GPT-2 alphabet) and SentencePiece byte
    fallback (`<0xE2>`) vocabularies; {} when the vocabulary is neither (no byte-level masking then)."""
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    probe = tokenizer.convert_ids_to_tokens(tokenizer.encode(" é", add_special_tokens=False))
    byte_level = all(isinstance(p, str) and all(c in to_byte for c in p) for p in probe) and b"".join(
        bytes(to_byte[c] for c in p) for p in probe
    ).endswith(" é".encode())
    out: dict[int, bytes] = {}
    for i in ids:
        piece = str(raw[i]) if i < len(raw) else ""
        fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if fallback:
            out[i] = bytes([int(fallback.group(1), 16)])
        elif byte_level and piece and all(c in to_byte for c in piece):
            out[i] = bytes(to_byte[c] for c in piece)
    return out


def _utf8_prefix(data: bytes) -> bool:
    """Whether `data` is valid UTF-8 so far (complete characters, then at most an unfinished one)."""
    if not data:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _vocab(engine: Engine, size: int) -> _Vocab:
    loaded = engine.loaded
    key = (loaded.fingerprint.digest, id(loaded.tokenizer), size, str(loaded.device))
    cached = _VOCABS.get(key)
    if cached is not None:
        return cached
    tokenizer = loaded.tokenizer
    pieces, specials, partial = _token_pieces(tokenizer, size)
    flags = {name: [False] * size for name in _CLASSES}
    flags["string_partial"] = partial
    piece_to_id: dict[str, int] = {}
    raw = tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))
    for i, piece in enumerate(pieces):
        if piece is None:
            continue
        for name, test in _CLASSES.items():
            if test(piece):
                flags[name][i] = True
        previous = piece_to_id.get(piece)
        if previous is None or re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", str(raw[previous])):
            piece_to_id[piece] = i  # prefer a real token over a byte-fallback one with the same text
    partial_bytes = _byte_pieces(tokenizer, [i for i, flag in enumerate(partial) if flag], raw)
    if partial_bytes:  # a character may only start with a lead byte (or a piece holding whole characters)
        flags["string_partial_start"] = [f and _utf8_prefix(partial_bytes.get(i, b"")) for i, f in enumerate(partial)]
    else:
        flags["string_partial_start"] = list(partial)
    masks = {name: torch.tensor(f, dtype=torch.bool, device=loaded.device) for name, f in flags.items()}
    max_piece = min(64, max((len(p) for p in piece_to_id), default=1))
    vocab = _Vocab(
        pieces=pieces,
        specials=specials,
        masks=masks,
        piece_to_id=piece_to_id,
        max_piece=max_piece,
        partial_bytes=partial_bytes,
    )
    _VOCABS[key] = vocab
    return vocab


# --- schema handling ----------------------------------------------------------------------------------


def _lookup(root: Any, ref: Any) -> Any:
    """Resolve a local JSON pointer (`#`, `#/$defs/X`, `#/definitions/X`, ...) against the root schema."""
    if not isinstance(ref, str):
        raise InvalidInputError(f"$ref must be a string, got {ref!r}")
    if not ref.startswith("#"):
        raise InvalidInputError(f"remote $ref {ref!r} is not supported: only local refs such as '#/$defs/Name'")
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise InvalidInputError(f"$ref {ref!r} does not resolve to anything in the schema")
    return node


def resolve_schema(root: Any, schema: Any) -> Any:
    """Follow local `$ref`s (against `root`) and fold `allOf` into one schema; cycles stop after 64 hops."""
    for _ in range(64):
        if not isinstance(schema, Mapping):
            return schema
        if "$ref" in schema:
            target = _lookup(root, schema["$ref"])
            siblings = {k: v for k, v in schema.items() if k != "$ref" and k not in _ANNOTATIONS}
            schema = _intersect(root, target, siblings) if isinstance(target, Mapping) else target
            continue
        if "allOf" in schema:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = resolve_schema(root, part)
                if part is False:
                    raise InvalidInputError("an allOf branch is the false schema: no value can satisfy it")
                if isinstance(part, Mapping):
                    merged = _intersect(root, merged, part)
            schema = merged
            continue
        return schema
    raise InvalidInputError("$ref chain too long; is the schema recursive?")


def with_siblings(root: Any, schema: Mapping[str, Any], branches: Sequence[Any]) -> list[Any]:
    """`anyOf`/`oneOf` branches with the keywords beside them merged in: `{"type": "object", "properties":
    {...}, "anyOf": [{"required": ["a"]}, ...]}` constrains every branch by its properties too."""
    siblings = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf", "nullable", *_ANNOTATIONS)}
    out, refused = [], []
    for branch in branches:
        branch = resolve_schema(root, branch)
        try:
            out.append(_intersect(root, siblings, branch) if isinstance(branch, Mapping) and siblings else branch)
        except InvalidInputError as exc:  # a branch no value can satisfy beside those keywords: not an option
            refused.append(exc)
    if refused and not out:
        raise refused[0]
    return out


def _intersect(root: Any, outer: Mapping[str, Any], inner: Mapping[str, Any]) -> dict[str, Any]:
    """Both schemas' constraints at once, as far as decoding reads them (`allOf` parts, `$ref` siblings,
    keywords beside `anyOf`): `type` intersected (integer is a number), `enum`/`const` met (no common
    value is refused by name), a property, `items` or `additionalProperties` in both held to both,
    `required` united; other keywords the inner's. The recursion ends: `check_schema` refuses recursive
    `$ref`s before decoding starts."""
    out = dict(outer)
    for key, value in inner.items():
        mine = out.get(key)
        if key == "type" and mine is not None:
            out[key] = _common_type(mine, value)
        elif key == "properties" and isinstance(mine, Mapping) and isinstance(value, Mapping):
            both = {**mine, **value}
            for name in set(mine) & set(value):
                both[name] = _meet(root, mine[name], value[name])
            out[key] = both
        elif key in ("items", "additionalProperties") and key in out:
            out[key] = _meet(root, mine, value)
        elif key == "required" and isinstance(mine, list) and isinstance(value, list):
            out[key] = mine + [v for v in value if v not in mine]
        elif key == "enum" and isinstance(mine, list) and isinstance(value, list):
            out[key] = [v for v in mine if v in value]
            if not out[key]:
                raise InvalidInputError(
                    f"two schemas that must both hold allow no common value: enum {mine!r} and {value!r}"
                )
        elif key == "const" and key in out and mine != value:
            raise InvalidInputError(f"two schemas that must both hold fix different values: {mine!r} and {value!r}")
        else:
            out[key] = value
    if "const" in out and isinstance(out.get("enum"), list):
        if out["const"] not in out["enum"]:
            raise InvalidInputError(
                f"two schemas that must both hold allow no common value: {out['const']!r} is not in {out['enum']!r}"
            )
        del out["enum"]
    return out


def _meet(root: Any, a: Any, b: Any) -> Any:
    """Two subschemas at once: `false` wins, `true` (or `{}`) gives the other, two objects intersect."""
    a, b = resolve_schema(root, a), resolve_schema(root, b)
    if a is False or b is False:
        return False
    if a is True:
        return b
    if b is True:
        return a
    return _intersect(root, a, b) if isinstance(a, Mapping) and isinstance(b, Mapping) else b


def _common_type(a: Any, b: Any) -> Any:
    first, second = ([a] if isinstance(a, str) else list(a)), ([b] if isinstance(b, str) else list(b))
    common = [t for t in first if t in second]
    common += ["integer" for x, y in ((first, second), (second, first)) if "integer" in x and "number" in y]
    common = list(dict.fromkeys(common))
    if not common:  # no value fits both: the branch's own type (the schema is unsatisfiable as written)
        return b
    return common[0] if len(common) == 1 else common


def _discriminators_first(root: Any, branches: list[Any]) -> list[Any]:
    """Object branches of a union with their required `const`/`enum` properties written first.

    A union is told apart by its first differing literal: `{"name": "` opens both `Cat` and `Dog` when
    `name` comes first, and the first branch would always win; `{"pet_type": "dog"` decides at once.
    JSON objects are unordered, so this changes no meaning."""
    if sum(1 for b in branches if isinstance(b, Mapping) and b.get("properties")) < 2:
        return branches

    def fixed(sub: Any) -> bool:
        sub = resolve_schema(root, sub)
        return isinstance(sub, Mapping) and ("const" in sub or "enum" in sub)

    out = []
    for branch in branches:
        props = branch.get("properties") if isinstance(branch, Mapping) else None
        if isinstance(props, Mapping):
            required = set(branch.get("required") or [])
            first = [k for k in props if k in required and fixed(props[k])]
            if first:
                branch = {
                    **branch,
                    "properties": {k: props[k] for k in [*first, *(k for k in props if k not in first)]},
                }
        out.append(branch)
    return out


def _types(schema: Mapping[str, Any]) -> list[str]:
    """The schema's types, inferred from its keywords when `type` is absent; [] means any value."""
    kind = schema.get("type")
    if kind is None:
        if any(k in schema for k in ("properties", "required", "additionalProperties")):
            return ["object"]
        if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
            return ["array"]
        return []
    kinds = [kind] if isinstance(kind, str) else list(kind)
    for k in kinds:
        if k not in TYPES:
            raise InvalidInputError(f"unsupported JSON schema type {k!r}: use one of {', '.join(TYPES)}")
    return kinds


def only_objects(root: Any, schema: Any = None) -> bool:
    """Whether every value `schema` (default: `root`) allows is a JSON object: what a tool call's
    arguments must be, as they are named."""
    schema = resolve_schema(root, root if schema is None else schema)
    if not isinstance(schema, Mapping):
        return False  # true (anything) or false (nothing)
    branches = schema.get("anyOf") or schema.get("oneOf")
    if branches:
        return all(only_objects(root, branch) for branch in with_siblings(root, schema, branches))
    return _types(schema) == ["object"]


def check_schema(schema: Any) -> None:
    """Fail early, with a message naming the problem, on schemas guided decoding cannot follow.

    Rejects unknown types, remote, dangling and recursive `$ref`s, empty `enum`/`anyOf` lists,
    contradictory array bounds and required properties that `additionalProperties: false` forbids.
    """
    checked: set[str] = set()

    def walk(node: Any, where: str, refs: tuple[str, ...]) -> None:
        if isinstance(node, bool):
            return
        if not isinstance(node, Mapping):
            raise InvalidInputError(f"schema at {where} must be an object or a boolean, got {type(node).__name__}")
        if "$ref" in node:
            ref = node["$ref"]
            if ref in refs:
                raise InvalidInputError(f"recursive $ref {ref!r} (at {where}) is not supported by guided decoding")
            target = _lookup(schema, ref)
            if ref not in checked:
                walk(target, ref, (*refs, ref))
                checked.add(ref)
        _types(node)
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise InvalidInputError(f"enum at {where} must be a non-empty list")
        for key in ("anyOf", "oneOf", "allOf"):
            if key in node:
                branches = node[key]
                if not isinstance(branches, list) or not branches:
                    raise InvalidInputError(f"{key} at {where} must be a non-empty list of schemas")
                for i, branch in enumerate(branches):
                    walk(branch, f"{where}/{key}/{i}", refs)
        props = node.get("properties", {})
        if not isinstance(props, Mapping):
            raise InvalidInputError(f"properties at {where} must be an object")
        for name, sub in props.items():
            walk(sub, f"{where}/properties/{name}", refs)
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise InvalidInputError(f"required at {where} must be a list of property names")
        extra = node.get("additionalProperties", True)
        if extra is False and any(r not in props for r in required):
            missing = [r for r in required if r not in props]
            raise InvalidInputError(f"required {missing} at {where} are not in properties and extra keys are off")
        if not isinstance(extra, bool):
            walk(extra, f"{where}/additionalProperties", refs)
        items = node.get("items")
        for i, sub in enumerate(node.get("prefixItems", []) or (items if isinstance(items, list) else [])):
            walk(sub, f"{where}/prefixItems/{i}", refs)
        if items is not None and not isinstance(items, list):
            walk(items, f"{where}/items", refs)
        lo, hi = node.get("minItems", 0), node.get("maxItems")
        if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
            raise InvalidInputError(f"minItems/maxItems at {where} are not valid bounds ({lo}, {hi})")

    walk(schema, "#", ())


# --- the decoder --------------------------------------------------------------------------------------


@dataclass
class _Alt:
    """One way to continue: a literal to write, or (literal None) a number whose first token is masked."""

    literal: str | None
    finish: Callable[[str], Any]  # called after the literal (or the number's first token) is written
    start: torch.Tensor | None = None


class GuidedDecoder:
    """Drives a prefilled cache: literal text is fed through the model, values are chosen under masks.

    `text` is everything written so far; `token_ids` lags behind by the last literal, which is fed
    together with what follows it (or by `finish_usage`). `truncated` says some text was written
    without the model because the budget ran out; `exhausted` only that the budget is spent.
    """

    def __init__(
        self,
        engine: Engine,
        state: Prefilled,
        settings: GenerationSettings,
        *,
        max_string_tokens: int | None = None,
    ) -> None:
        if max_string_tokens is not None and max_string_tokens < 1:
            raise InvalidInputError(
                f"max_string_tokens must be >= 1 (or None: the token budget), got {max_string_tokens}"
            )
        self.engine = engine
        self.state = state
        self.settings = settings
        self.max_string_tokens = max_string_tokens
        self.text = ""
        self.token_ids: list[int] = []
        self.truncated = False  # some text was written without being fed (the budget ran out), or a string cut
        self.strings_cut = 0
        self.first_token_at: float | None = None
        self._pending = ""  # literal text written but not yet fed, so it tokenizes together with what follows
        self._logits = state.logits
        self._vocab = _vocab(engine, int(state.logits.shape[-1]))
        self._generator = make_generator(settings, engine.loaded.device)
        self._root: Any = {}

    @property
    def exhausted(self) -> bool:
        """The budget is spent; whatever is still written is appended without the model (see `truncated`)."""
        return len(self.token_ids) >= self.settings.max_new_tokens

    def finish_usage(self) -> Usage:
        """Feed the trailing literal; return the prefill's usage with output tokens, TTFT and total time.

        Call it last: the trailing tokens are counted without running the model on them.
        """
        self._flush(run=False)
        usage = self.state.usage
        now = time.perf_counter()
        usage.output_tokens = len(self.token_ids)
        usage.ttft_ms = ((self.first_token_at or now) - self.state.started_at) * 1000
        usage.total_ms = (now - self.state.started_at) * 1000
        return usage

    # -- feeding

    def _feed(self, ids: Sequence[int], *, run: bool = True) -> None:
        """Run ids through the model, as many as the budget allows (`run=False`: only count them)."""
        take = list(ids)[: max(0, self.settings.max_new_tokens - len(self.token_ids))]
        if len(take) < len(ids):
            self.truncated = True
        if not take:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.token_ids.extend(take)
        if run and not self.exhausted:  # the last budgeted token's logits would never be used
            self._logits = forward(self.engine.loaded, self.state.cache, take)

    def _flush(self, *, run: bool = True) -> None:
        if self._pending:
            ids = self._encode(self._pending)
            self._pending = ""
            self._feed(ids, run=run)

    def _live(self) -> bool:
        """Feed pending text; True while the model still has budget to decide anything."""
        self._flush()
        return not self.exhausted

    def _encode(self, literal: str) -> list[int]:
        """Token ids whose texts join to exactly `literal`.

        The tokenizer's own ids are used when they do; SentencePiece tokenizers that prepend a
        word-start space to every encoded text fall back to a greedy longest match on token texts.
        """
        vocab = self._vocab
        cached = vocab.encoded.get(literal)
        if cached is not None:
            return cached
        ids = list(self.engine.loaded.tokenizer.encode(literal, add_special_tokens=False))
        if "".join(self._text_of(i) or "\0" for i in ids) != literal:
            greedy: list[int] = []
            pos = 0
            while pos < len(literal):
                for size in range(min(vocab.max_piece, len(literal) - pos), 0, -1):
                    tok = vocab.piece_to_id.get(literal[pos : pos + size])
                    if tok is not None:
                        greedy.append(tok)
                        pos += size
                        break
                else:
                    break
            if pos == len(literal):
                ids = greedy
        if len(vocab.encoded) > 10000:
            vocab.encoded.clear()
        vocab.encoded[literal] = ids
        return ids

    def _text_of(self, token: int) -> str | None:
        pieces = self._vocab.pieces
        piece = pieces[token] if 0 <= token < len(pieces) else None
        return piece if piece is not None else self._vocab.specials.get(token)

    def emit(self, literal: str) -> None:
        """Append literal text; its tokens are fed before the next decision (or by `finish_usage`).

        Deferring lets a literal tokenize together with the next one (a closing quote and the comma
        after it), as the model saw such text in training. Past the budget the text is only appended.
        """
        self.text += literal
        self._pending += literal

    def _push(self, token: int) -> str:
        piece = self._vocab.pieces[token] or ""
        self.text += piece
        self._feed([token])
        return piece

    def _sample(self, mask: torch.Tensor | None) -> int:
        self._flush()
        logits = self._logits if mask is None else self._logits.masked_fill(~mask, float("-inf"))
        return next_token(logits, self.settings, self._generator)

    # -- choices

    def _select(self, alts: Sequence[_Alt]) -> tuple[int, str]:
        """Pick an alternative token by token; returns its index and, for a number, its first token's text.

        Only alternatives still consistent with the tokens fed so far stay alive. Where one has ended
        and others go on, the model continues only if its own choice (over the whole vocabulary) is a
        continuing token. Out of budget, the first live alternative wins, so callers list the cheapest
        (closing) one first. Pending literal text is tokenized as the start of every alternative.
        """
        if not alts:
            raise InvalidInputError("nothing to choose from")
        if any(a.literal is None for a in alts):
            self._flush()  # a number's first token is sampled straight after what is already written
        lead, self._pending = self._pending, ""
        seqs = [self._encode(lead + a.literal) if a.literal is not None else [] for a in alts]
        alive = list(range(len(alts)))
        pos = 0
        while True:
            literal_alive = [i for i in alive if alts[i].literal is not None]
            ended = [i for i in literal_alive if len(seqs[i]) == pos]
            going: dict[int, list[int]] = {}
            for i in literal_alive:
                if len(seqs[i]) > pos:
                    going.setdefault(seqs[i][pos], []).append(i)
            numbers = [i for i in alive if alts[i].literal is None] if pos == 0 else []
            if self.exhausted or len(alive) == 1 or (not going and not numbers):
                winner = alive[0] if self.exhausted or len(alive) == 1 else ended[0]
                if alts[winner].literal is not None or self.exhausted:
                    break
            if not ended and not numbers and len(going) == 1:  # a shared token: feed the whole shared run
                run = []
                while all(len(seqs[i]) > pos and seqs[i][pos] == seqs[alive[0]][pos] for i in alive):
                    run.append(seqs[alive[0]][pos])
                    pos += 1
                self._feed(run)
                continue
            mask = torch.zeros_like(self._vocab.masks["string"])
            for i in numbers:
                start = alts[i].start
                assert start is not None
                mask |= start
            mask[list(going)] = True
            token = self._sample(None if ended else mask)
            if ended and not bool(mask[token]):
                winner = ended[0]
                break
            for i in numbers:
                start = alts[i].start
                assert start is not None
                if bool(start[token]):
                    return i, self._push(token)
            self._feed([token])
            alive = going[token]
            pos += 1
        literal = alts[winner].literal
        if literal is None:  # out of budget before a number started
            return winner, ""
        self.text += literal
        done = "".join(self._text_of(t) or "\0" for t in seqs[winner][:pos])
        full = lead + literal
        if full.startswith(done):
            self._pending = full[len(done) :]  # the rest joins whatever is written next
        else:
            self._feed(seqs[winner][pos:])
        return winner, ""

    def _pick(self, alts: Sequence[_Alt]) -> Any:
        index, piece = self._select(alts)
        return alts[index].finish(piece)

    def choose(self, options: Sequence[str]) -> int:
        """Let the model pick one literal (greedy, or sampled with the settings); emit it; return its index."""
        if not options:
            raise InvalidInputError("choose() needs at least one option")
        return self._select([_Alt(o, lambda _: None) for o in options])[0]

    def value(self, schema: Mapping[str, Any]) -> Any:
        """Emit a JSON value valid for `schema` (resolving refs against it) and return it as Python."""
        check_schema(schema)
        self._root = schema
        resolved = resolve_schema(schema, schema)
        if resolved is True or (isinstance(resolved, Mapping) and not _types(resolved) and _is_any(resolved)):
            resolved = {"type": "object"}  # a bare `{}` at the root: a free-form object
        return self._pick(self._alternatives(resolved))

    # -- alternatives per schema

    def _then(self, prefix: str, alts: Sequence[_Alt], cont: Callable[[Any], Any]) -> list[_Alt]:
        """`prefix` followed by a value from `alts`, then `cont(value)`; literal values are folded in.

        Folding (`, "color": "red"` versus `, "color": "blue"` versus `}`) lets one choice cover the
        key and the value, so unions of objects are told apart by their first key and value.
        """
        if all(a.literal is not None for a in alts) and len(alts) <= MAX_EXPANDED_ALTERNATIVES:
            return [_Alt(prefix + (a.literal or ""), _chain(a.finish, cont)) for a in alts]
        return [_Alt(prefix, lambda _: cont(self._pick(alts)))]

    def _alternatives(self, schema: Any) -> list[_Alt]:
        """Every way a value for `schema` can start; a union is simply the concatenation of its branches."""
        schema = resolve_schema(self._root, schema)
        if schema is True:
            schema = {}
        if schema is False or not isinstance(schema, Mapping):
            raise InvalidInputError("the schema allows no value here (false schema)")
        if "const" in schema:
            return [self._literal(schema["const"])]
        if "enum" in schema:
            return [self._literal(v) for v in schema["enum"]]
        branches = schema.get("anyOf") or schema.get("oneOf")
        if branches:
            branches = _discriminators_first(self._root, with_siblings(self._root, schema, branches))
            out = [alt for branch in branches for alt in self._alternatives(branch)]
        else:
            kinds = _types(schema) or ["string", "number", "boolean", "null", "object"]
            out = [alt for kind in kinds for alt in self._typed(kind, schema)]
        if schema.get("nullable") is True:
            out.append(self._literal(None))
        return out

    def _literal(self, value: Any) -> _Alt:
        return _Alt(json.dumps(value, ensure_ascii=False), lambda _: value)

    def _typed(self, kind: str, schema: Mapping[str, Any]) -> list[_Alt]:
        if kind == "null":
            return [self._literal(None)]
        if kind == "boolean":
            return [self._literal(False), self._literal(True)]
        if kind == "string":
            return [_Alt('"', lambda _: self._string_rest())]
        if kind in ("integer", "number"):
            integer = kind == "integer"
            low = schema.get("minimum", schema.get("exclusiveMinimum"))
            signed = isinstance(low, bool) or not (isinstance(low, int | float) and low >= 0)
            start = self._vocab.masks["int_start"] | self._vocab.masks["zero"]
            if signed:
                start = start | self._vocab.masks["minus"] | self._vocab.masks["minus_int"]
            return [_Alt(None, lambda p: self._number_rest(p, integer), start=start)]
        if kind == "array":
            return self._array_alts(schema)
        if kind == "object":
            return self._object_alts(schema)
        raise InvalidInputError(f"unsupported JSON schema type {kind!r}")

    # -- strings and numbers

    def _string_rest(self) -> str:
        """Characters after an opening quote, until the model prefers a closing quote; then the quote."""
        masks = self._vocab.masks
        allowed = masks["string"] | masks["string_close"] | masks["string_partial_start"]
        parts: list[str] = []
        pending_bytes: list[int] = []  # tokens of a multi-byte character not yet complete
        cap = self.max_string_tokens
        closed, steps = False, 0
        # the cap ends a string only between characters: a character begun is finished, so the text stays
        # what the model saw; only a spent budget (text appended unfed from then on) cuts one
        while self._live() and (cap is None or steps < cap or pending_bytes):
            steps += 1
            # within a multi-byte character only the byte pieces that continue it validly may follow, so it
            # is neither cut by an ordinary token nor spelled wrong (both leave a replacement mark)
            token = self._sample(self._continuations(pending_bytes) if pending_bytes else allowed)
            if bool(masks["string_partial"][token]):
                pending_bytes.append(token)
                self._feed([token])
                decoded = self._decode_run(pending_bytes)
                if "\ufffd" not in decoded:
                    parts.append(decoded)
                    self.text += decoded
                    pending_bytes = []
                continue
            if bool(masks["string_close"][token]) or not bool(masks["string"][token]):
                closed = True
                break
            pending_bytes = []  # a character left incomplete spells nothing valid: it is left out
            parts.append(self._push(token))
        # a character the budget cut is left out too: its byte pieces were fed, but past the budget the text
        # is no longer what the model saw, and the value stays valid text ending at its last whole character
        if not closed and self._live():  # cut at `max_string_tokens`, not by the model: say so
            self.truncated = True
            self.strings_cut += 1
        self.emit('"')
        return "".join(parts)

    def _continuations(self, pending: Sequence[int]) -> torch.Tensor:
        """Byte pieces that keep `pending` valid UTF-8 (any byte piece where their bytes are unknown)."""
        known = self._vocab.partial_bytes
        partial = self._vocab.masks["string_partial"]
        if not known or any(t not in known for t in pending):
            return partial
        head = b"".join(known[t] for t in pending)
        cached = self._vocab.continuations.get(head)
        if cached is None:  # at most a few hundred heads (lead bytes and their continuations): built once each
            ok = [t for t, b in known.items() if _utf8_prefix(head + b)]
            mask = torch.zeros_like(partial)
            if ok:
                mask[torch.tensor(ok, dtype=torch.long, device=mask.device)] = True
            cached = self._vocab.continuations[head] = mask if bool(mask.any()) else partial
        return cached

    def _decode_run(self, ids: Sequence[int]) -> str:
        return str(self.engine.loaded.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False))

    def _number_rest(self, text: str, integer: bool) -> int | float:
        """Digits after the first token, until the model prefers a non-number token; at least one digit."""
        masks = self._vocab.masks
        fraction = masks["dot"] | masks["dot_digits"]
        for _ in range(MAX_NUMBER_TOKENS):
            body = text[1:] if text.startswith("-") else text
            if not body:
                allowed = masks["int_start"] | masks["zero"]
            elif "." in body:
                allowed = masks["digits"]
            elif body == "0":  # no leading zeros: only a fraction may follow
                allowed = torch.zeros_like(fraction) if integer else fraction
            else:
                allowed = masks["digits"] if integer else masks["digits"] | fraction
            if not bool(allowed.any()) or not self._live():
                break
            if body and not body.endswith("."):  # complete: go on only if the model's own choice is a digit
                token = self._sample(None)
                if not bool(allowed[token]):
                    break
            else:
                token = self._sample(allowed)
            text += self._push(token)
        body = text[1:] if text.startswith("-") else text
        if not body or body.endswith("."):
            self.emit("0")
            text += "0"
        value = json.loads(text)
        return int(value) if integer else value

    # -- arrays

    def _array_alts(self, schema: Mapping[str, Any]) -> list[_Alt]:
        prefix = list(schema.get("prefixItems") or [])
        items = schema.get("items", True)
        if isinstance(items, list):  # draft-04 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        low = int(schema.get("minItems", 0))
        high = schema.get("maxItems")
        cap = max(low, min(MAX_ARRAY_ITEMS if high is None else int(high), MAX_ARRAY_ITEMS))
        if items is False:
            cap = min(cap, len(prefix)) if low <= len(prefix) else low

        def item_schema(n: int) -> Any:
            return prefix[n] if n < len(prefix) else items

        def rest(first: Any) -> list[Any]:
            out = [first]
            while True:
                n = len(out)
                if n >= cap:
                    self.emit("]")
                    return out
                more = self._then(", ", self._alternatives(item_schema(n)), lambda v: v)
                if n < low:
                    out.append(self._pick(more))
                    continue
                got = self._pick([_Alt("]", lambda _: _CLOSE), *more])
                if got is _CLOSE:
                    return out
                out.append(got)

        alts = [_Alt("[]", lambda _: [])] if low == 0 else []
        if cap > 0:
            alts += self._then("[", self._alternatives(item_schema(0)), rest)
        return alts

    # -- objects

    def _object_alts(self, schema: Mapping[str, Any]) -> list[_Alt]:
        props = dict(schema.get("properties") or {})
        required = list(schema.get("required") or [])
        extra = schema.get("additionalProperties", True)
        for name in required:
            if name not in props:
                props[name] = extra if isinstance(extra, Mapping) else {}
        if not props:
            # declared properties, even none (a tool without arguments), close the object unless
            # additionalProperties explicitly allows more; only an object with no "properties" is free-form
            if extra is False or ("properties" in schema and "additionalProperties" not in schema):
                return [_Alt("{}", lambda _: {})]
            return self._free_object_alts(extra if isinstance(extra, Mapping) else None)
        fields = [(name, sub, name in required) for name, sub in props.items()]

        def steps(i: int) -> list[int | None]:
            """Properties that may come next: optional ones up to the first required one, else the end."""
            out: list[int] = []
            for k in range(i, len(fields)):
                out.append(k)
                if fields[k][2]:
                    return [k, *out[:-1]]  # the required one first: it is what an exhausted budget writes
            return [None, *out]

        def options(i: int, lead: str) -> list[_Alt]:
            alts: list[_Alt] = []
            for k in steps(i):
                if k is None:
                    alts.append(_Alt("{}" if lead == "{" else "}", lambda _: _CLOSE))
                else:
                    key = lead + json.dumps(fields[k][0], ensure_ascii=False) + ": "
                    alts += self._then(key, self._alternatives(fields[k][1]), functools.partial(_pair, k))
            return alts

        def rest(first: Any) -> dict[str, Any]:
            out: dict[str, Any] = {}
            got = first
            while got is not _CLOSE:
                k, v = got
                out[fields[k][0]] = v
                if k + 1 >= len(fields):
                    self.emit("}")
                    break
                got = self._pick(options(k + 1, ", "))
            return out

        return [_Alt(a.literal, _chain(a.finish, rest), a.start) for a in options(0, "{")]

    def _free_object_alts(self, values: Mapping[str, Any] | None) -> list[_Alt]:
        """An object whose keys the model writes; values follow `values` or are any primitive."""
        value_schema: Any = values if values is not None else {"type": ["string", "number", "boolean", "null"]}

        def rest(_: str) -> dict[str, Any]:
            out: dict[str, Any] = {}
            while True:
                key = self._string_rest()
                self.emit(": ")
                out[key] = self._pick(self._alternatives(value_schema))
                if len(out) >= MAX_FREE_KEYS:
                    self.emit("}")
                    return out
                if self._pick([_Alt("}", lambda _: _CLOSE), _Alt(', "', lambda _: None)]) is _CLOSE:
                    return out

        return [_Alt("{}", lambda _: {}), _Alt('{"', rest)]


def _chain(first: Callable[[str], Any], then: Callable[[Any], Any]) -> Callable[[str], Any]:
    return lambda piece: then(first(piece))


def _pair(key: int, value: Any) -> tuple[int, Any]:
    return key, value


def _is_any(schema: Mapping[str, Any]) -> bool:
    """True when nothing but annotations constrains the value."""
    return all(k in _ANNOTATIONS or k in ("$defs", "definitions") for k in schema)


def generate_json(
    engine: Engine,
    prompt_ids: Sequence[int],
    schema: Mapping[str, Any],
    settings: GenerationSettings | None = None,
    *,
    max_string_tokens: int | None = None,
    **prefill_kwargs: Any,
) -> GuidedResult:
    """Prefill `prompt_ids` and write a JSON value for `schema`; takes `Engine.prefill`'s keywords."""
    check_schema(schema)
    settings = settings or GenerationSettings()
    state = engine.prefill(prompt_ids, settings, **prefill_kwargs)
    return decode_json(engine, state, schema, settings, max_string_tokens=max_string_tokens)


def decode_json(
    engine: Engine,
    state: Prefilled,
    schema: Mapping[str, Any],
    settings: GenerationSettings,
    *,
    max_string_tokens: int | None = None,
) -> GuidedResult:
    """Write a JSON value for `schema` from an already prefilled prompt (its cache is private to it)."""
    decoder = GuidedDecoder(engine, state, settings, max_string_tokens=max_string_tokens)
    decoder.value(schema)
    # the budget is only ever spent: one not spent by now was there for every choice the value needed
    complete = not decoder.exhausted
    usage = decoder.finish_usage()  # feeds the closing literal first, so truncation is known below
    return GuidedResult(
        text=decoder.text,
        value=json.loads(decoder.text),
        token_ids=list(decoder.token_ids),
        usage=usage,
        finish_reason="length" if decoder.truncated else "stop",
        strings_cut=decoder.strings_cut,
        complete=complete,
    )
