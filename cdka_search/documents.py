"""Strict reading of JSON and YAML documents, and of their mappings into frozen dataclasses.

Every document cdka reads (plans, recipes, config.json, safetensors headers and indexes, adapter
metadata) goes through ``read_json`` or ``read_yaml``. Both refuse what a hand-written or generated
file never needs and a hostile one uses: nesting deeper than ``MAX_DEPTH``, duplicate keys (which
would otherwise silently keep the last value), documents over ``MAX_DOCUMENT_BYTES``, and, in JSON,
the non-JSON constants NaN/Infinity and numbers that overflow. YAML anchors and aliases are refused:
no plan or recipe needs them, and they let a few bytes expand into gigabytes ("billion laughs").
Messages show values through ``brief``, which bounds what they print whatever the value's size.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

from cdka_search.errors import CdkaError, PlanError

T = TypeVar("T")

MAX_DEPTH = 32  # plans nest 4 deep, configs and headers 3; 32 leaves room for any real document
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024  # JSON; the largest real config.json is well under 1 MB
MAX_YAML_BYTES = 2 * 1024 * 1024  # a per-layer plan of a 70B model is about 250 KB; YAML parses slowly
_BRIEF_CHARS = 60


@dataclass(frozen=True)
class JsonLimits:
    """Bounds on a JSON document checked before it is parsed, by counting bytes in C: its size, its
    objects ({), arrays ([) and separators (, : every element after a container's first). With
    them, parsing a hostile document can neither take long nor build millions of Python objects."""

    max_bytes: int = MAX_DOCUMENT_BYTES
    max_objects: int = 100_000
    max_arrays: int = 100_000
    max_commas: int = 1_000_000

    def check(self, data: bytes | str, where: str, error: type[CdkaError]) -> int:
        """Raise ``error`` past a bound; else the number of { and [ (a bound on how deep it nests)."""
        if len(data) > self.max_bytes:
            raise error(f"{where}: {len(data):,} bytes is larger than such a document can be ({self.max_bytes:,})")
        brace, bracket, comma = ("{", "[", ",") if isinstance(data, str) else (b"{", b"[", b",")
        counts = []
        for sign, limit, what in ((brace, self.max_objects, "objects"), (bracket, self.max_arrays, "arrays"), (comma, self.max_commas, "elements")):
            counts.append(data.count(sign))  # type: ignore[arg-type]
            if counts[-1] > limit:
                raise error(f"{where}: more {what} than such a document can hold ({limit:,})")
        return counts[0] + counts[1]


def brief(value: Any, limit: int = _BRIEF_CHARS) -> str:
    """A repr of ``value`` at most about ``limit`` characters long, however large ``value`` is."""
    import reprlib  # only on error paths

    shorten = reprlib.Repr()
    shorten.maxlevel, shorten.maxlist, shorten.maxdict, shorten.maxtuple = 2, 4, 4, 4
    shorten.maxstring = shorten.maxother = shorten.maxlong = limit
    text = shorten.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (controls such as ESC, bidirectional
    overrides, line breaks) written as its Python escape: names read from files reach a screen as data."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def named(text: str, limit: int = _BRIEF_CHARS) -> str:
    """``text`` as typed when it is short and printable (a path, a model name), else its brief repr."""
    return text if len(text) <= limit and text.isprintable() else brief(text, limit)


def _too_deep(data: Any) -> bool:
    """True when containers nest deeper than MAX_DEPTH (iterative: no recursion on hostile input)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _no_duplicates(where: str, error: type[CdkaError]):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{where}: duplicate key {brief(key)}")
            out[key] = value
        return out

    return hook


def _finite_float(where: str, error: type[CdkaError]):
    def hook(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise error(f"{where}: number {brief(text)} is out of range")
        return value

    return hook


def strict_json_hooks(where: str, error: type[CdkaError]) -> dict[str, Any]:
    """Keyword arguments of ``json.loads`` that refuse duplicate keys, NaN/Infinity and numbers that
    overflow, each as ``error`` naming ``where``."""

    def refuse_constant(name: str) -> Any:
        raise error(f"{where}: {name} is not a JSON value")

    return {"object_pairs_hook": _no_duplicates(where, error), "parse_constant": refuse_constant,
            "parse_float": _finite_float(where, error)}


def read_json(data: bytes | str, where: str, error: type[CdkaError], limits: JsonLimits = JsonLimits()) -> Any:
    """Parse strict JSON: no NaN/Infinity, no overflowing numbers, no duplicate keys, bounded depth
    and size (``limits``)."""
    containers = limits.check(data, where, error)
    import json

    try:
        text = utf8_text(data, where, error) if isinstance(data, bytes) else data
        parsed = json.loads(text, **strict_json_hooks(where, error))
    except CdkaError:
        raise
    except RecursionError:
        raise error(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise error(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except ValueError:  # an integer with more digits than Python converts
        raise error(f"{where}: a number is too long") from None
    if containers > MAX_DEPTH and _too_deep(parsed):  # fewer brackets cannot nest that deep: no walk
        raise error(f"{where}: nested deeper than {MAX_DEPTH} levels")
    return parsed


def read_yaml(text: str, where: str, error: type[CdkaError]) -> Any:
    """Parse safe YAML (JSON included): no anchors or aliases, no duplicate keys, bounded depth.

    Built from the parser's events with an explicit stack (libyaml's parser where installed), so
    neither deep nesting nor a large document recurses or composes a node tree. Scalars are null,
    bool, int, float or str; a date or time stays the text written, and ``2e-4`` is a number, as YAML 1.2
    reads them (no cdka document has dates, and a ``datetime`` would reach messages as its Python repr)."""
    if len(text) > MAX_YAML_BYTES:
        raise error(f"{where}: {len(text):,} characters is larger than a plan or recipe can be ({MAX_YAML_BYTES:,})")
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        return _data_from_events(loader, where, error)
    except CdkaError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise error(f"{where}: not valid YAML{at}") from None
    finally:
        loader.dispose()


def _data_from_events(loader: Any, where: str, error: type[CdkaError]) -> Any:
    import yaml
    from yaml import events

    constructors = yaml.constructor.SafeConstructor.yaml_constructors
    stack: list[list[Any]] = []  # [container, pending key or _NO_KEY]
    documents, root = 0, None
    scalars: dict[tuple[Any, ...], Any] = {}

    def add(value: Any, event: Any) -> None:
        nonlocal root
        if not stack:
            root = value
            return
        top = stack[-1]
        if isinstance(top[0], list):
            top[0].append(value)
        elif top[1] is _NO_KEY:
            if isinstance(value, (list, dict)):
                raise error(f"{where}: a mapping key must be a plain value (line {_line(event)})")
            if value in top[0]:
                raise error(f"{where}: duplicate key {brief(value)} (line {_line(event)})")
            top[1] = value
        else:
            top[0][top[1]] = value
            top[1] = _NO_KEY

    # Scalars first: a per-layer plan is mostly scalar events, and each test below costs per event.
    while loader.check_event():
        event = loader.get_event()
        kind = type(event)
        if kind is events.ScalarEvent:
            if event.anchor is not None:
                raise error(f"{where}: YAML anchors and aliases (& and *) are not allowed (line {_line(event)})")
            key = (event.tag, event.value, event.implicit, event.style)
            if key in scalars:  # a per-layer plan repeats a few values thousands of times
                add(scalars[key], event)
                continue
            tag = event.tag
            if tag is None or tag == "!":
                tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
                if tag == _STR_TAG and event.implicit[0] and YAML12_FLOAT.fullmatch(event.value):  # plain, not quoted
                    tag = _FLOAT_TAG  # 2e-4, 1.0e5: YAML 1.1 (PyYAML) reads them as text, YAML 1.2 as numbers
            if tag == _TIMESTAMP_TAG:
                value = event.value
            elif tag in _SCALAR_TAGS:
                node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
                try:
                    value = constructors[tag](loader, node)
                except (ValueError, KeyError, IndexError, AttributeError):  # what PyYAML's constructors raise on an explicit tag's bad text
                    raise error(f"{where}: {_bad_scalar(tag, event.value)} (line {_line(event)})") from None
            else:
                raise error(f"{where}: YAML tag {brief(tag)} is not allowed (line {_line(event)})")
            if isinstance(value, (str, int, float, bool, type(None))):  # immutable: safe to share
                scalars[key] = value
            add(value, event)
        elif kind is events.SequenceStartEvent or kind is events.MappingStartEvent:
            if event.anchor is not None:
                raise error(f"{where}: YAML anchors and aliases (& and *) are not allowed (line {_line(event)})")
            mapping = kind is events.MappingStartEvent
            if event.tag not in (None, "!", "tag:yaml.org,2002:map" if mapping else "tag:yaml.org,2002:seq"):
                raise error(f"{where}: YAML tag {brief(event.tag)} is not allowed (line {_line(event)})")
            if len(stack) >= MAX_DEPTH:
                raise error(f"{where}: nested deeper than {MAX_DEPTH} levels")
            stack.append([{} if mapping else [], _NO_KEY])
        elif kind is events.SequenceEndEvent or kind is events.MappingEndEvent:
            add(stack.pop()[0], event)
        elif kind is events.AliasEvent:
            raise error(f"{where}: YAML anchors and aliases (& and *) are not allowed (line {_line(event)})")
        elif kind is events.DocumentStartEvent:
            documents += 1
            if documents > 1:
                raise error(f"{where}: holds more than one YAML document (line {_line(event)})")
    return root


_NO_KEY = object()
_SCALAR_TAGS = frozenset(f"tag:yaml.org,2002:{kind}" for kind in ("null", "bool", "int", "float", "str"))
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_STR_TAG, _FLOAT_TAG = "tag:yaml.org,2002:str", "tag:yaml.org,2002:float"
YAML12_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")  # the YAML 1.2 core schema's


def _line(event: Any) -> int:
    """The 1-based line an event starts on (1 when the parser gives no mark)."""
    return event.start_mark.line + 1 if event.start_mark else 1


def _bad_scalar(tag: str, text: str) -> str:
    """Why a scalar's text does not make a value of its tag (``!!int 11.7``, ``!!bool maybe``)."""
    kind = tag.rsplit(":", 1)[-1]
    if kind == "int" and re.fullmatch(r"[-+]?[0-9_]+", text):
        return "a number is too long"  # more digits than Python converts
    return f"{brief(text)} is not a valid {kind}"


def regular_file(path: str | os.PathLike[str], error: type[CdkaError], missing: str | None = None) -> Path:
    """``path`` if it is a regular file (or a link to one); else ``error``: ``missing`` (default "no such
    file") when nothing is there, "not a regular file" for a folder, FIFO or device, which a reader
    would block on or report as missing."""
    file = Path(path)
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise error(missing or f"{file}: no such file") from None
    except OSError as exc:
        raise error(f"{file}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{file}: not a regular file")
    return file


def read_file_bytes(path: str | os.PathLike[str], error: type[CdkaError], max_bytes: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; a missing, special (a FIFO would block),
    unreadable or oversized file is ``error``."""
    file = regular_file(path, error)
    try:
        with file.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:  # removed since it was checked
        raise error(f"{file}: no such file") from None
    except OSError as exc:
        raise error(f"{file}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    if len(data) > max_bytes:
        raise error(f"{file}: larger than such a document can be ({max_bytes:,} bytes)")
    return data


def utf8_text(data: bytes, where: str, error: type[CdkaError]) -> str:
    """``data`` as the text an editor shows: UTF-8 without a leading byte-order mark, and every line
    break (CRLF, a lone CR) a LF. Windows editors write both, and text read otherwise kept a stray
    U+FEFF (or a JSON document was refused for it) and a CR at each line's end."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{where}: not UTF-8 text") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def read_text_file(path: str | os.PathLike[str], error: type[CdkaError], max_bytes: int = MAX_YAML_BYTES) -> str:
    """``read_file_bytes`` as text (``utf8_text``)."""
    return utf8_text(read_file_bytes(path, error, max_bytes), str(path), error)


def reject_unknown(data: Mapping[str, Any], allowed: Iterable[str], where: str, error: type[CdkaError] = PlanError) -> None:
    """Raise ``error`` naming the first key not in ``allowed``, the nearest allowed key, and all of them."""
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            import difflib  # only on the error path

            near = difflib.get_close_matches(str(key)[:100], allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise error(f"{where}: unknown key {brief(key)}{hint}; allowed: {', '.join(allowed)}")


def strict_dataclass(cls: type[T], data: Any, where: str, error: type[CdkaError] = PlanError) -> T:
    """``cls(**data)`` for a mapping whose keys are all fields of ``cls``; every failure is ``error``."""
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected a mapping")
    reject_unknown(data, [f.name for f in fields(cls)], where, error)  # type: ignore[arg-type]
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]  # type: ignore[arg-type]
    missing = [name for name in required if name not in data]
    if missing:
        raise error(f"{where}: missing key(s) {', '.join(missing)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise error(f"{where}: {exc}") from None
