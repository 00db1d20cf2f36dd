"""Tool calls in free text: find them in the formats small models actually write, and repair them.

Small models mix conventions and make JSON mistakes, so the parser accepts, in order of precedence:

* Hermes blocks `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (several; the last may be
  unterminated), and Llama 3.1's `<function=name>{...}</function>`;
* otherwise, the whole reply as a JSON call object or list of them (after a `<|python_tag|>` or
  `[TOOL_CALLS]` prefix, inside ``` fences, or bare), Mistral's `[TOOL_CALLS]name[ARGS]{...}`, fenced
  call objects inside prose, and a Python-style `name(a=1)` (or a list of them) when `name` is a known
  tool and the call is the whole reply.

A call object may say `parameters` (or `args`) for `arguments`, give them as a JSON string, or be
OpenAI-shaped (`{"function": {"name": ..., "arguments": "..."}}`). JSON is repaired for trailing commas,
single quotes, Python literals, unquoted keys, missing closers at the end and stray closers. Arguments
are coerced to the tool's schema. Anything that looks like a call but cannot be made one becomes a
problem note (an invalid tool call upstream) rather than disappearing or leaking into the content.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInputError
from ..prompts.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from ..prompts.tools import format_tool_call_block as format_tool_call
from .json_decoding import resolve_schema, with_siblings

__all__ = ["ParsedToolCall", "call_text", "format_tool_call", "new_call_id", "parse_tool_calls", "repair_json"]
_ID_ALPHABET = string.ascii_letters + string.digits
_FUNCTION_TAG = re.compile(r"<function=([\w.\-]+)>(.*?)(?:</function>|$)", re.DOTALL)
_FENCE = re.compile(r"```[\w-]*[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_MISTRAL_ARGS = re.compile(r"([\w.\-]+)\[ARGS\]")
_PREFIXES = ("<|python_tag|>", "[TOOL_CALLS]")
CALL_MARKERS = (*_PREFIXES, "[ARGS]", TOOL_CALL_OPEN, TOOL_CALL_CLOSE, "<function=", "</function>")
_NOT_JSON = object()
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}


@dataclass(frozen=True)
class ParsedToolCall:
    """One call: the tool's name, its (schema-coerced) arguments, and a fresh call id."""

    name: str
    arguments: dict[str, Any]
    id: str


def new_call_id() -> str:
    """Nine random alphanumerics: the one id shape every template accepts (Mistral demands exactly it)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


# --- lenient JSON ----------------------------------------------------------------------------------


def repair_json(text: str) -> str:
    """Rewrite near-JSON into JSON: quotes, trailing commas, Python literals, bare keys, closers.

    A single string-aware pass: single-quoted strings become double-quoted, `True/False/None` become
    JSON literals, bare keys get quotes, closers with no matching opener are dropped, commas before a
    closer are removed, and at the end an open string is closed, a dangling key gets `null`, and open
    brackets are closed.
    """
    out: list[str] = []
    stack: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and i + 1 < len(text):
                nxt = text[i + 1]
                out.append(nxt if quote == "'" and nxt == "'" else c + nxt)
                i += 2
                continue
            if c == quote:
                out.append('"')
                quote = ""
            else:
                out.append('\\"' if c == '"' else c)  # a double quote inside a single-quoted string
            i += 1
            continue
        if c in "\"'":
            quote = c
            out.append('"')
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
            out.append(c)
        elif c in "}]":
            if stack and stack[-1] == c:  # an unmatched closer is dropped
                out = _without_trailing_comma(out)
                out.append(stack.pop())
        elif c.isalpha() or c == "_":
            j = i
            while j < len(text) and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            is_key = stack and stack[-1] == "}" and text[j:].lstrip().startswith(":")
            out.append(
                json.dumps(word) if is_key else {"True": "true", "False": "false", "None": "null"}.get(word, word)
            )
            i = j
            continue
        else:
            out.append(c)
        i += 1
    if quote:
        out.append('"')
    if "".join(out).rstrip().endswith(":"):
        out.append(" null")
    while stack:
        out = _without_trailing_comma(out)
        out.append(stack.pop())
    return "".join(out)


def _without_trailing_comma(out: list[str]) -> list[str]:
    joined = "".join(out).rstrip()
    return [joined[:-1] if joined.endswith(",") else joined]


def _json_values(text: str) -> list[Any]:
    return _json_scan(text)[0]


def _json_scan(text: str) -> tuple[list[Any], str]:
    """The JSON values at the start of `text`, in order (repaired if need be), and the prose after them."""
    text = text.strip()
    if not text:
        return [], ""
    try:
        return [json.loads(text, strict=False)], ""
    except ValueError:
        pass
    decoder = json.JSONDecoder(strict=False)
    for candidate in (text, repair_json(text)):
        values: list[Any] = []
        pos = end = 0
        while True:
            while pos < len(candidate) and (candidate[pos].isspace() or candidate[pos] == ","):
                pos += 1
            if pos >= len(candidate) or candidate[pos] not in "{[":
                break
            try:
                value, pos = decoder.raw_decode(candidate, pos)
            except ValueError:
                break
            values.append(value)
            end = pos
        if values:  # the rest (stray closers dropped) is only meaningful in the unrepaired text
            return values, candidate[end:].lstrip(" \t\r\n,}]").strip() if candidate is text else ""
    return [], ""


def call_text(tokenizer: Any, ids: Sequence[int], text: str) -> str:
    """The reply as tool-call parsing needs it. Ordinary decoding drops special tokens, and some models'
    call markers are special tokens (Llama 3.1's `<|python_tag|>`, Mistral's `[TOOL_CALLS]` and `[ARGS]`):
    `Let me check.<|python_tag|>{...}` would read as prose followed by stray JSON. The ids are decoded
    again keeping those markers (every other special token still dropped); `text` as it was otherwise,
    or where the two disagree beyond the markers (a stop sequence cut the text)."""
    full = str(tokenizer.decode(list(ids), skip_special_tokens=False))
    if not any(m in full and m not in text for m in CALL_MARKERS):
        return text
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", None) or []}
    specials |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values() if t.special}
    kept = full
    for special in sorted(specials - set(CALL_MARKERS), key=len, reverse=True):
        kept = kept.replace(special, "")

    def unmarked(x: str) -> str:
        for marker in CALL_MARKERS:
            x = x.replace(marker, "")
        return x

    want = unmarked(text)
    if not unmarked(kept).startswith(want):
        return text
    # a stop sequence cut `text`: cut `kept` where its marker-free characters reach the same length
    i = count = 0
    while count < len(want) and i < len(kept):
        marker = next((m for m in CALL_MARKERS if kept.startswith(m, i)), None)
        if marker:
            i += len(marker)
        else:
            i, count = i + 1, count + 1
    return kept[:i]


# --- call objects ----------------------------------------------------------------------------------


def _call_shaped(obj: Any) -> bool:
    if not isinstance(obj, Mapping):
        return False
    if isinstance(obj.get("function"), Mapping):
        return _call_shaped(obj["function"])
    keys = set(obj)
    has_args = bool(keys & {"arguments", "parameters", "args"})
    return isinstance(obj.get("name"), str) and (has_args or keys <= {"name", "id", "type"})


def _flatten(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(v if isinstance(v, list) else [v])
    return out


class _Collector:
    """Turns candidate call objects into calls or problem notes, coercing arguments to the tool schema."""

    def __init__(self, tools: Mapping[str, Mapping[str, Any]] | None) -> None:
        self.tools = tools
        self.calls: list[ParsedToolCall] = []
        self.problems: list[str] = []

    def add_object(self, obj: Any, source: str) -> None:
        if not _call_shaped(obj):
            self.problems.append(f"not a tool call (needs 'name' and 'arguments'): {_clip(source)}")
            return
        if isinstance(obj.get("function"), Mapping):
            obj = obj["function"]
        args = next((obj[k] for k in ("arguments", "parameters", "args") if k in obj), None)
        self.add(obj["name"], args, source)

    def add(self, name: str, args: Any, source: str) -> None:
        if self.tools is not None and name not in self.tools:
            known = ", ".join(sorted(self.tools)) or "none"
            self.problems.append(f"call to unknown tool {name!r} (known tools: {known}): {_clip(source)}")
            return
        if isinstance(args, str):
            parsed = _json_values(args) if args.strip() else [{}]
            args = parsed[0] if len(parsed) == 1 else _NOT_JSON
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            self.problems.append(f"arguments of the call to {name!r} are not a JSON object: {_clip(source)}")
            return
        arguments = dict(args)
        if self.tools is not None:
            schema = self.tools[name]
            arguments = _coerce_object(arguments, schema, schema)
            required = _resolve(schema, schema).get("required", [])
            missing = [r for r in required if r not in arguments]
            if missing:
                self.problems.append(f"call to {name!r} lacks required argument(s) {missing}: {_clip(source)}")
                return
        self.calls.append(ParsedToolCall(name=name, arguments=arguments, id=new_call_id()))

    def _plausible(self, obj: Mapping[str, Any]) -> bool:
        """Unmarked JSON is a call only if it names a bound tool or carries arguments: `{"name": "Alice"}`
        is an answer, not a call to a tool named Alice."""
        inner = obj["function"] if isinstance(obj.get("function"), Mapping) else obj
        has_args = bool(set(inner) & {"arguments", "parameters", "args"})
        return has_args or self.tools is None or inner.get("name") in self.tools

    def add_json(self, text: str, *, required: bool) -> str | None:
        """Calls from JSON text; returns the prose after them, or None if the text holds no calls.

        `required`: the text was marked as a call, so anything unusable becomes a problem note.
        """
        values, rest = _json_scan(text)
        values = _flatten(values)
        if values and all(_call_shaped(v) and (required or self._plausible(v)) for v in values):
            for v in values:
                self.add_object(v, json.dumps(v, ensure_ascii=False))
            return rest
        if not required:
            return None
        for v in values:
            self.add_object(v, json.dumps(v, ensure_ascii=False, default=str))
        if not values:
            self.problems.append(f"could not parse tool call: {_clip(text)}")
        return rest


def _clip(text: str, limit: int = 200) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- argument coercion -----------------------------------------------------------------------------


def _schema_types(schema: Mapping[str, Any]) -> list[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    return []


def _resolve(root: Any, schema: Any) -> Mapping[str, Any]:
    try:
        out = resolve_schema(root, schema)
    except InvalidInputError:
        return {}
    return out if isinstance(out, Mapping) else {}


def _matches(value: Any, kind: str) -> bool:
    checks: dict[str, Any] = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    check = checks.get(kind)
    return bool(check(value)) if check else True


def _coerce(value: Any, schema: Any, root: Any) -> Any:
    """Convert a value to what its schema expects when the conversion is unambiguous; else leave it."""
    sub = _resolve(root, schema)
    if not sub:
        return value
    if "enum" in sub and value not in sub["enum"] and isinstance(value, str):
        folded = [e for e in sub["enum"] if isinstance(e, str) and e.lower() == value.strip().lower()]
        if folded:
            return folded[0]
        try:  # "2" for the integer member 2
            parsed = json.loads(value.strip())
        except ValueError:
            return value
        members = [e for e in sub["enum"] if not isinstance(e, str) and e == parsed and type(e) is type(parsed)]
        return members[0] if members else value
    branches = sub.get("anyOf") or sub.get("oneOf")
    if isinstance(branches, list):
        resolved = [_resolve(root, b) for b in with_siblings(root, sub, branches)]
        for b in resolved:  # already fits a branch: recurse into that one
            if any(_matches(value, k) for k in _schema_types(b)):
                return _coerce(value, b, root)
        for b in resolved:  # else the first branch it converts to
            converted = _coerce(value, b, root)
            if any(_matches(converted, k) for k in _schema_types(b)):
                return converted
        return value
    kinds = _schema_types(sub) or (["object"] if "properties" in sub else ["array"] if "items" in sub else [])
    if not kinds:
        return value
    if any(_matches(value, k) for k in kinds):
        kind = next(k for k in kinds if _matches(value, k))
        return _coerce_typed(value, kind, sub, root)
    for kind in kinds:
        converted = _convert(value, kind)
        if converted is not _NOT_JSON:
            return _coerce_typed(converted, kind, sub, root)
    return value


def _coerce_typed(value: Any, kind: str, schema: Mapping[str, Any], root: Any) -> Any:
    """Recurse into containers that already have the right type."""
    if kind == "array" and isinstance(value, list):
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", True)
        return [_coerce(v, prefix[i] if i < len(prefix) else items, root) for i, v in enumerate(value)]
    if kind == "object" and isinstance(value, dict):
        return _coerce_object(value, schema, root)
    return value


def _convert(value: Any, kind: str) -> Any:
    """One scalar conversion (string "3" -> 3, "true" -> True, scalar -> [scalar], ...) or _NOT_JSON."""
    if isinstance(value, str):
        text = value.strip()
        if kind == "integer" and re.fullmatch(r"[-+]?\d+", text):
            return int(text)
        if kind == "integer" and re.fullmatch(r"[-+]?\d+\.0*", text):
            return int(float(text))
        if kind == "number" and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
            return float(text)
        if kind == "boolean" and text.lower() in ("true", "false", "yes", "no"):
            return text.lower() in ("true", "yes")
        if kind == "null" and text.lower() in ("null", "none", ""):
            return None
        if kind in ("array", "object") and text[:1] in "[{":
            parsed = _json_values(text)
            if len(parsed) == 1 and _matches(parsed[0], kind):
                return parsed[0]
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "string" and isinstance(value, int | float | bool):
        return json.dumps(value)
    if kind == "array" and not isinstance(value, list | dict):
        return [value]
    return _NOT_JSON


def _coerce_object(args: dict[str, Any], schema: Any, root: Any) -> dict[str, Any]:
    sub = _resolve(root, schema)
    props = sub.get("properties")
    if not isinstance(props, Mapping):
        return args
    extra = sub.get("additionalProperties", True)
    out: dict[str, Any] = {}
    for key, value in args.items():
        if key in props:
            out[key] = _coerce(value, props[key], root)
        elif extra is False:
            continue
        else:
            out[key] = _coerce(value, extra, root) if isinstance(extra, Mapping) else value
    return out


# --- Python-style calls ----------------------------------------------------------------------------

_PY_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _py_value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _PY_NAMES:
        return _PY_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _py_value(node.operand)
        if isinstance(inner, int | float) and not isinstance(inner, bool):
            return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.List | ast.Tuple):
        return [_py_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_py_value(k): _py_value(v) for k, v in zip(node.keys, node.values) if k is not None}
    raise ValueError(f"unsupported argument expression {ast.dump(node)[:60]}")


def _python_calls(text: str, tools: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]] | None:
    """`name(a=1)` or `[a(x=1), b()]` (also `name.call(...)`) naming known tools, or None."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return None
    nodes = tree.body.elts if isinstance(tree.body, ast.List) else [tree.body]
    calls: list[tuple[str, dict[str, Any]]] = []
    for node in nodes:
        if not isinstance(node, ast.Call):
            return None
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "call" and isinstance(func.value, ast.Name):
            func = func.value
        if not isinstance(func, ast.Name) or func.id not in tools:
            return None
        try:
            args: dict[str, Any] = {}
            order = list(_resolve(tools[func.id], tools[func.id]).get("properties", {}))
            if len(node.args) > len(order):
                return None
            for key, positional in zip(order, node.args):
                args[key] = _py_value(positional)
            for kw in node.keywords:
                if kw.arg is None:
                    return None
                args[kw.arg] = _py_value(kw.value)
        except (ValueError, InvalidInputError):
            return None
        calls.append((func.id, args))
    return calls or None


# --- the parser ------------------------------------------------------------------------------------


def parse_tool_calls(
    text: str, tools: Mapping[str, Mapping[str, Any]] | None, *, cut: bool = False
) -> tuple[str, list[ParsedToolCall], list[str]]:
    """Find tool calls in a reply; returns (content without the call markup, calls, problem notes).

    `tools` maps each tool name to its JSON-schema `parameters`; when given, only those names count
    and arguments are coerced to the schema. `None` accepts any name and leaves arguments as written.
    `cut`: the reply was cut off by the token budget. A call it ends inside is then not a call (repair
    would close it with its arguments cut short, and an agent would run it) but a problem note.
    """
    content, calls, problems = _parse(text, tools)
    opened = _open_call_at(text) if cut else None
    if opened is None:
        return content, calls, problems
    start, marked = opened
    head, kept, head_problems = _parse(text[:start], tools) if start > 0 else ("", [], [])
    dropped = calls[len(kept) :]
    # unmarked, the budget may have cut prose (an open bracket or quote); but JSON opened after whole calls
    # is the next call, which repair could not make one of
    next_call = bool(kept) and text[start:].lstrip("[ \t\r\n").startswith("{")
    if not dropped and not marked and not next_call:
        return content, calls, problems
    notes = [
        f"the call to {call.name!r} was cut off by max_tokens before it was complete (its arguments would be "
        "cut short): raise max_tokens"
        for call in dropped
    ] or ["a tool call was cut off by max_tokens before it could be read: raise max_tokens"]
    return head, kept, head_problems + notes


def _open_call_at(text: str) -> tuple[int, bool] | None:
    """Where what `text` ends inside begins, and whether it is call markup (`<tool_call>`, `<function=`);
    None if the text ends closed. Without markup it is the outermost JSON bracket (or string) left open:
    calls before it are whole."""
    if TOOL_CALL_OPEN in text:
        spans = _hermes_spans(text)
        return (spans[-1][0], True) if spans and not spans[-1][3] else None
    if "<function=" in text:
        start = text.rfind("<function=")
        return (start, True) if "</function>" not in text[start:] else None
    opened = _open_json_at(text)
    if opened is None:
        return None
    marker = min((text.find(p) for p in _PREFIXES if 0 <= text.find(p) <= opened), default=None)
    # after `<|python_tag|>` or `[TOOL_CALLS]` everything is meant as calls: the cut reaches back to it
    return (marker, True) if marker is not None else (opened, False)


def _open_json_at(text: str) -> int | None:
    """The outermost `{`/`[` (or, outside any, the `"`) still open at the end of `text`, or None."""
    stack: list[int] = []
    quote_at, escaped = -1, False
    for i, c in enumerate(text):
        if quote_at >= 0:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                quote_at = -1
        elif c == '"':
            quote_at = i
        elif c in "{[":
            stack.append(i)
        elif c in "}]" and stack:
            stack.pop()
    if stack:
        return stack[0]
    return quote_at if quote_at >= 0 else None


def _hermes_spans(text: str) -> list[tuple[int, int, str, bool]]:
    """(start, end, body, closed) of each `<tool_call>` block. A body is read as JSON first, so a closing
    tag inside one of its strings (a call that writes markup) does not end the block."""
    spans = []
    decoder = json.JSONDecoder(strict=False)
    pos = 0
    while (start := text.find(TOOL_CALL_OPEN, pos)) >= 0:
        inner = start + len(TOOL_CALL_OPEN)
        value_at = len(text) - len(text[inner:].lstrip())
        span = None
        try:
            _, stop = decoder.raw_decode(text, value_at)
            close_at = len(text) - len(text[stop:].lstrip())
            if text.startswith(TOOL_CALL_CLOSE, close_at):
                span = (start, close_at + len(TOOL_CALL_CLOSE), text[inner:stop], True)
        except ValueError:
            pass
        if span is None:
            close = text.find(TOOL_CALL_CLOSE, inner)
            closed = close >= 0
            end = close + len(TOOL_CALL_CLOSE) if closed else len(text)
            span = (start, end, text[inner : close if closed else len(text)], closed)
        spans.append(span)
        pos = span[1]
    return spans


def _parse(text: str, tools: Mapping[str, Mapping[str, Any]] | None) -> tuple[str, list[ParsedToolCall], list[str]]:
    found = _Collector(tools)
    if TOOL_CALL_OPEN in text or "<function=" in text:
        pieces, pos = [], 0
        for start, end, body, _ in _hermes_spans(text):
            pieces.append(text[pos:start])
            found.add_json(_unfence(body), required=True)
            pos = end
        content = "".join(pieces) + text[pos:]
        content = _FUNCTION_TAG.sub(lambda m: _function_tag(found, m.group(1), m.group(2)), content)
        return content.replace(TOOL_CALL_CLOSE, "").strip(), found.calls, found.problems

    body = text.strip()
    markers = [(body.find(p), p) for p in _PREFIXES if p in body]
    if markers:
        at, prefix = min(markers)
        return _after_marker(found, body[:at].strip(), body[at + len(prefix) :].strip())
    return _unmarked(found, text)


def _function_tag(found: _Collector, name: str, body: str) -> str:
    values = _json_values(body) if body.strip() else [{}]
    found.add(name, values[0] if len(values) == 1 else body, f"<function={name}>{body}")
    return ""


def _after_marker(found: _Collector, head: str, body: str) -> tuple[str, list[ParsedToolCall], list[str]]:
    """After `<|python_tag|>` or `[TOOL_CALLS]` everything is meant as calls: parse or report."""
    unfenced = _unfence(body)
    if _MISTRAL_ARGS.match(unfenced):  # [TOOL_CALLS]name[ARGS]{...}, possibly repeated
        parts = _MISTRAL_ARGS.split(unfenced)[1:]
        for name, args in zip(parts[::2], parts[1::2]):
            values = _json_values(args)
            found.add(name, values[0] if len(values) == 1 else args, f"{name}[ARGS]{args}")
        return head, found.calls, found.problems
    if _add_python(found, unfenced):
        return head, found.calls, found.problems
    rest = found.add_json(unfenced, required=True)
    return "\n".join(t for t in (head, rest) if t), found.calls, found.problems


def _add_python(found: _Collector, text: str) -> bool:
    """Python-style calls of known tools (the whole text); True if that is what the text was."""
    python = _python_calls(text, found.tools) if found.tools is not None else None
    for name, args in python or []:
        found.add(name, args, text)
    return bool(python)


def _unfence(text: str) -> str:
    text = text.strip()
    match = _FENCE.fullmatch(text)
    return match.group(1).strip() if match else text


def _unmarked(found: _Collector, text: str) -> tuple[str, list[ParsedToolCall], list[str]]:
    """No call markup: the whole reply, or fenced blocks inside prose, may still be call objects."""
    whole = _unfence(text)
    rest = found.add_json(whole, required=False) if whole[:1] in "{[" else None
    if rest is not None:
        return rest, found.calls, found.problems
    if _add_python(found, whole):
        return "", found.calls, found.problems

    def fenced(match: re.Match[str]) -> str:
        inner = match.group(1).strip()
        rest = found.add_json(inner, required=False) if inner[:1] in "{[" else None
        return match.group(0) if rest is None else rest

    content = _FENCE.sub(fenced, text) if "```" in text else text
    return content.strip(), found.calls, found.problems
