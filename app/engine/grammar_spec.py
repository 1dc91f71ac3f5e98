"""Grammar specs (what a request constrains its output to), their limits, and the cheap
pure-Python checks that keep oversized or pathological inputs away from the compiler."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

GrammarKind = Literal["json_object", "json_schema", "regex", "choice", "ebnf"]


class GrammarError(ValueError):
    """A grammar that is invalid, unsupported, too large, too deep, or too slow to compile."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to; `source` is canonical so equal specs hash equal.

    A JSON schema's key order is kept, not sorted: xgrammar emits properties in schema order,
    and that order is the user's (e.g. "reasoning" before "answer")."""

    kind: GrammarKind
    source: str

    @classmethod
    def for_json_object(cls) -> GrammarSpec:
        return cls("json_object", "")

    @classmethod
    def for_json_schema(cls, schema: dict[str, Any] | bool | str) -> GrammarSpec:
        """A JSON schema given as a dict/bool or as JSON text."""
        try:
            value = json.loads(schema) if isinstance(schema, str) else schema
            source = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except RecursionError:
            raise GrammarError("invalid JSON schema: nested too deeply") from None
        except (TypeError, ValueError) as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from None
        if not isinstance(value, dict | bool):
            raise GrammarError("invalid JSON schema: must be a JSON object or boolean")
        return cls("json_schema", source)

    @classmethod
    def for_regex(cls, pattern: str) -> GrammarSpec:
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("regex must be a non-empty string")
        return cls("regex", pattern)

    @classmethod
    def for_choice(cls, choices: Sequence[str]) -> GrammarSpec:
        if (
            isinstance(choices, str)
            or not isinstance(choices, Sequence)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise GrammarError("choice must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))

    @classmethod
    def for_ebnf(cls, grammar: str) -> GrammarSpec:
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("EBNF grammar must be a non-empty string")
        return cls("ebnf", grammar)

    @classmethod
    def from_response_format(cls, response_format: dict[str, Any]) -> GrammarSpec | None:
        """OpenAI `response_format` (text / json_object / json_schema) or lmdeploy's regex_schema;
        None for plain text."""
        if not isinstance(response_format, dict):
            raise GrammarError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.for_json_object()
        if kind == "json_schema":
            body = response_format.get("json_schema")
            if not isinstance(body, dict):
                raise GrammarError("response_format.json_schema must be an object")
            # OpenAI makes `schema` optional; without one any JSON object is accepted.
            if "schema" not in body:
                return cls.for_json_object()
            return cls.for_json_schema(body["schema"])
        if kind == "regex_schema":
            return cls.for_regex(response_format.get("regex_schema"))  # type: ignore[arg-type]
        raise GrammarError(
            "response_format.type must be one of text, json_object, json_schema, regex_schema"
        )

    @classmethod
    def from_guided(
        cls,
        *,
        guided_json: dict[str, Any] | str | None = None,
        guided_regex: str | None = None,
        guided_choice: Sequence[str] | None = None,
        guided_grammar: str | None = None,
    ) -> GrammarSpec | None:
        """vLLM's guided_* request fields (at most one may be set); None when none is."""
        makers = (
            (guided_json, cls.for_json_schema),
            (guided_regex, cls.for_regex),
            (guided_choice, cls.for_choice),
            (guided_grammar, cls.for_ebnf),
        )
        given = [(value, make) for value, make in makers if value is not None]
        if len(given) > 1:
            raise GrammarError(
                "only one of guided_json, guided_regex, guided_choice, guided_grammar may be set"
            )
        return given[0][1](given[0][0]) if given else None  # type: ignore[operator]

    @cached_property
    def key(self) -> bytes:
        """Cache key: a digest of kind and source."""
        text = f"{self.kind}\0{self.source}".encode("utf-8", "surrogatepass")
        return hashlib.sha256(text).digest()


@dataclass(frozen=True)
class GrammarLimits:
    """Bounds checked before compiling, and the compile time and cache memory caps."""

    max_source_chars: int = 100_000
    max_nesting: int = 64
    max_repetition: int = 100_000
    compile_timeout_s: float = 10.0
    cache_max_bytes: int = 256 * 2**20


DEFAULT_LIMITS = GrammarLimits()


def precheck(spec: GrammarSpec, limits: GrammarLimits) -> None:
    """Cheap checks that keep oversized or pathological inputs away from the compiler."""
    if len(spec.source) > limits.max_source_chars:
        raise GrammarError(
            f"{spec.kind} source is {len(spec.source)} characters, "
            f"over the limit of {limits.max_source_chars}"
        )
    if spec.kind == "json_schema":
        _check_scan(spec.source, "json", limits)
        schema = json.loads(spec.source)
        _check_schema(schema, limits.max_repetition)
        for pattern in schema_patterns(schema):
            _check_scan(pattern, "regex", limits)
    elif spec.kind in ("regex", "ebnf"):
        _check_scan(spec.source, spec.kind, limits)


def _check_scan(text: str, syntax: str, limits: GrammarLimits) -> None:
    depth, bound = _scan(text, syntax)
    what = {"json": "JSON schema", "regex": "regex", "ebnf": "EBNF grammar"}[syntax]
    if depth > limits.max_nesting:
        raise GrammarError(f"{what} is nested too deeply (over {limits.max_nesting} levels)")
    if bound > limits.max_repetition:
        raise GrammarError(
            f"{what} repetition count {bound} is over the limit of {limits.max_repetition}"
        )


_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def _scan(text: str, syntax: str) -> tuple[int, int]:
    """Maximum bracket nesting and largest {m,n} repetition count, in one linear pass that skips
    escapes, string literals (JSON, EBNF), character classes (regex, EBNF) and EBNF comments."""
    openers, closers = ("[{", "]}") if syntax == "json" else ("(", ")")
    quotes = syntax in ("json", "ebnf")
    classes = syntax in ("regex", "ebnf")
    depth = max_depth = max_bound = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if quotes and ch == '"':
            i = _skip_until(text, i + 1, '"')
        elif classes and ch == "[":
            i = _skip_until(text, i + 1, "]")
        elif syntax == "ebnf" and ch == "#":
            newline = text.find("\n", i)
            i = n if newline < 0 else newline
        elif ch in openers:
            depth += 1
            max_depth = max(max_depth, depth)
        elif ch in closers:
            depth = max(depth - 1, 0)
        elif ch == "{":
            match = _QUANTIFIER.match(text, i)
            if match:
                numbers = [int(g) for g in match.groups() if g]
                max_bound = max(max_bound, *numbers, 0)
        i += 1
    return max_depth, max_bound


def _skip_until(text: str, i: int, end: str) -> int:
    """Index of the unescaped `end` at or after i (len(text) if none)."""
    n = len(text)
    while i < n and text[i] != end:
        i += 2 if text[i] == "\\" else 1
    return i


def schema_patterns(schema: Any) -> list[str]:
    """Every `pattern` string in a schema (found wherever it is a string-valued keyword)."""
    found: list[str] = []
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                found.append(pattern)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


# Keywords that assert something about a value but that xgrammar leaves out of the grammar it
# builds: refused, so a response can never silently fail its own schema.
_IGNORED_BY_XGRAMMAR = (
    "not", "if", "then", "else", "contains", "minContains", "maxContains", "dependencies",
    "dependentRequired", "dependentSchemas", "$dynamicRef", "$recursiveRef",
)  # fmt: skip
# Formats xgrammar turns into a grammar; other formats are annotations (as JSON Schema allows).
_FORMATS = frozenset((
    "date", "date-time", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
    "uri-reference", "uri-template", "uuid", "json-pointer", "relative-json-pointer",
))  # fmt: skip
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
# Where subschemas sit (keywords refused above need no visit).
_ONE_SUBSCHEMA = ("additionalProperties", "unevaluatedProperties", "items", "unevaluatedItems",
                  "additionalItems", "propertyNames")  # fmt: skip
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")


def _check_schema(schema: Any, max_repetition: int) -> None:
    """Refuse what xgrammar would not enforce; GrammarError names the keyword and where it is."""
    stack: list[tuple[str, Any]] = [("", schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        where = f" at '{path}'" if path else ""

        def refuse(reason: str, where: str = where) -> GrammarError:
            return GrammarError(f"unsupported JSON schema{where}: {reason}")

        for keyword in _IGNORED_BY_XGRAMMAR:
            if keyword in node:
                raise refuse(f"keyword '{keyword}' is not supported")
        if len(node.get("allOf") or ()) > 1:
            raise refuse("'allOf' with more than one subschema is not supported")
        if node.get("uniqueItems") is True:
            raise refuse("keyword 'uniqueItems' is not supported")
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and (ref == "#" or ref[:2] == "#/")):
            raise refuse(f"only local '$ref's ('#/...') are supported, got {ref!r}"[:200])
        if "multipleOf" in node:
            divisor = node["multipleOf"]
            if node.get("type") != "integer" or type(divisor) is not int or divisor <= 0:
                raise refuse("'multipleOf' needs type 'integer' and a positive whole number")
        lengths = [k for k in ("minLength", "maxLength") if k in node]
        if node.get("format") in _FORMATS and ("pattern" in node or lengths):
            other = "pattern" if "pattern" in node else lengths[0]
            raise refuse(f"'format' cannot be combined with '{other}'")
        if "pattern" in node and lengths:
            raise refuse(f"'pattern' cannot be combined with '{lengths[0]}'")
        for keyword in _COUNTS:
            value = node.get(keyword)
            if value is not None and not (type(value) is int and 0 <= value <= max_repetition):
                raise refuse(f"'{keyword}' must be a whole number from 0 to {max_repetition}")
        properties = node.get("properties")
        names = properties if isinstance(properties, dict) else {}
        for name in node.get("required") or ():
            if name not in names:
                raise refuse(f"required property {name!r} is not defined in 'properties'"[:200])

        for keyword in _ONE_SUBSCHEMA:
            stack.append((f"{path}/{keyword}", node.get(keyword)))
        for keyword in _SUBSCHEMA_MAPS:
            children = node.get(keyword)
            if isinstance(children, dict):
                stack.extend((f"{path}/{keyword}/{k}", v) for k, v in children.items())
        for keyword in _SUBSCHEMA_LISTS:
            children = node.get(keyword)
            if isinstance(children, list):
                stack.extend((f"{path}/{keyword}/{i}", v) for i, v in enumerate(children))
