"""A short config of the usual shape, read without PyYAML.

Importing PyYAML costs ~13 ms of CPU (its reader and resolver compile their patterns),
a tenth of a small config's whole apply. Most configs are a handful of top-level
`key: value` lines and prefix lists, in block (`- 10.0.0.0/8` lines) or flow
(`[10.0.0.0/8, 192.168.0.0/16]`) style, with comments. Such a text is read here, to the
same document libyaml builds; anything else, or anything in doubt (a key twice, a tab,
a value YAML 1.1 might read as a number, a date or a bool we do not spell out here, a
quote with an escape, an anchor, a nested mapping...), returns None and is left to
PyYAML (text.py), which also says what is wrong with it. tests/test_config_plain.py
compares the two on generated texts.
"""

from __future__ import annotations

import re
from typing import Any

# PyYAML's implicit bool and null (yaml/resolver.py): spelled out, so they are read as it
# reads them. Every other plain scalar starting with a letter is a string to it.
_BOOL = {"yes": True, "Yes": True, "YES": True, "no": False, "No": False, "NO": False, "true": True,
         "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False, "on": True, "On": True,
         "ON": True, "off": False, "Off": False, "OFF": False}
_NULL = ("null", "Null", "NULL")

_KEY_LINE = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*):(?: +(.*))?")
_ITEM_LINE = re.compile(r"( *)- +(.*)")
# A plain scalar: no space, no indicator YAML gives a meaning to inside one; not ending in ':'
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./:+@-]*(?<!:)")
# Starting with a digit, a string to YAML 1.1 only when it holds '/' (a prefix: no number
# or date pattern of the resolver allows '/'), or is a port range (`1024-65535`: a date has
# two dashes), or a Go duration (`60s`, `1m30s`: no number pattern allows those letters)
_DIGIT_STRING = re.compile(r"[0-9][0-9A-Fa-f:.]*/[0-9]+|[0-9]+-[0-9]+|(?:[0-9]+(?:ns|us|ms|s|m|h))+")
_INT = re.compile(r"0|[1-9][0-9]{0,17}")
_QUOTED = re.compile(r"'([^'\\]*)'|\"([^\"\\]*)\"")


class _Doubt(Exception):
    """Not read here: PyYAML reads it."""


def read(text: str) -> dict[str, Any] | None:
    """The document libyaml makes of `text`, or None where this reader does not apply."""
    if not text.isascii() or not text.replace("\n", "").isprintable():
        return None  # a tab, a carriage return, a control or non-ASCII character: PyYAML's
    try:
        return _read(text.split("\n"))
    except _Doubt:
        return None


def _read(lines: list[str]) -> dict[str, Any] | None:
    doc: dict[str, Any] = {}
    i, n = 0, len(lines)
    while i < n:
        line = _content(lines[i])
        i += 1
        if not line:
            continue
        m = _KEY_LINE.fullmatch(line)
        if m is None:
            raise _Doubt  # indented, a sequence at the top, a document marker, a directive...
        key, rest = m.group(1), m.group(2)
        if key in _BOOL or key in _NULL or key in doc:
            raise _Doubt
        if rest:
            doc[key] = _flow(rest) if rest.startswith("[") else _scalar(rest)
            continue
        # `key:` and then a block sequence, or nothing (null)
        items: list[Any] = []
        indent = None
        while i < n:
            line = _content(lines[i])
            if not line:
                i += 1
                continue
            item = _ITEM_LINE.fullmatch(line)
            if item is None or (indent is not None and len(item.group(1)) != indent):
                if line[0] == " " or line[0] == "-":
                    raise _Doubt  # more indented (a continuation, a nested mapping) or misaligned
                break
            indent = len(item.group(1))
            items.append(_scalar(item.group(2)))
            i += 1
        doc[key] = items if indent is not None else None
    return doc or None


def _content(line: str) -> str:
    """The line without its comment and trailing spaces ('#' is in no token read here, so
    the first one starts a comment, when a space or the line's start is before it)."""
    cut = line.find("#")
    if cut >= 0:
        if cut > 0 and line[cut - 1] != " ":
            raise _Doubt
        line = line[:cut]
    return line.rstrip(" ")


def _scalar(token: str) -> Any:
    quoted = _QUOTED.fullmatch(token)
    if quoted is not None:
        return quoted.group(1) if quoted.group(1) is not None else quoted.group(2)
    if _PLAIN.fullmatch(token) is None:
        raise _Doubt
    if token[0].isalpha() or token[0] == "_":
        if token in _BOOL:
            return _BOOL[token]
        return None if token in _NULL else token
    if _INT.fullmatch(token):
        return int(token)
    if _DIGIT_STRING.fullmatch(token):
        return token
    raise _Doubt


def _flow(token: str) -> list[Any]:
    """`[a, b]` on one line, of scalars without ':' (libyaml's flow rules for a ':' are subtle)."""
    if not token.endswith("]") or token.count("[") != 1 or token.count("]") != 1:
        raise _Doubt
    inner = token[1:-1].strip(" ")
    if not inner:
        return []
    out = []
    for part in inner.split(","):
        part = part.strip(" ")
        if not part or ":" in part or "{" in part or "}" in part:
            raise _Doubt
        out.append(_scalar(part))
    return out
