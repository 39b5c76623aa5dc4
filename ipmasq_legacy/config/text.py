"""Reading a config text: YAML or JSON, exactly as libyaml reads it, fast for long lists.

Shared by every input shape (this tool's file, Cilium's values.yaml and cilium-config,
the ip-masq-agent file). Errors are ConfigErrors naming the file.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from .. import inputs, prefixes
from ..errors import ConfigError
from .plain import read as read_plain

# PyYAML is imported when a text is first parsed (~13 ms of CPU: a no-op reconcile parses
# nothing, agent.py); `Loader`, `SAFE_LOADER` and `yaml` are this module's names for it
# all the same (__getattr__ below).


def __getattr__(name: str) -> Any:
    if name in ("Loader", "SAFE_LOADER", "yaml"):
        return _yaml()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_text(path: Path, what: str) -> str:
    """The file's text; `what` ("config file") starts the error message. Regular files
    only, at most inputs.MAX_FILE_BYTES, UTF-8 (inputs.py)."""
    return inputs.read_text(path, what)


def read_yaml(path: Path, what: str) -> Any:
    return _parse_text(read_text(path, what), f"{what} {inputs.show_path(path)}")


# ------------------------------------------------------------- bounds on what YAML builds
# An alias is a reference: libyaml and PyYAML build `[&a [1,2], *a, *a]` as one list
# referenced three times, so a "billion laughs" document loads fast, and then every walk
# over it (a message quoting the value, a check of each item) takes forever. Documents
# with aliases are measured first: the nodes their aliases add, counted as often as they
# are referenced, may be ALIAS_NODES_LIMIT at most (go-yaml, which ip-masq-agent and
# kubectl use, has a limit of the same kind), and an alias inside what it names is refused.

ALIAS_NODES_LIMIT = 100_000
NUMBER_CHARS_LIMIT = 100  # an integer of more digits is refused (Python's int() refuses 4,300)
_MERGE_TAG = "tag:yaml.org,2002:merge"


@cache
def _yaml() -> dict[str, Any]:
    """{"yaml": the module, "SAFE_LOADER": libyaml's loader when PyYAML has it (ten times
    faster on long prefix lists), "Loader": ours}."""
    import yaml

    safe_loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(safe_loader):  # type: ignore[valid-type,misc]  # CSafeLoader or SafeLoader
        """SAFE_LOADER that notes keys given twice in one mapping (PyYAML keeps the last one
        silently) and refuses integers too long to be meant."""

        def __init__(self, stream):
            super().__init__(stream)
            self.duplicates: list[tuple[Any, int, int]] = []  # (key, first line, second line)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[tuple, int] = {}
                for key_node, _value in node.value:
                    if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                        continue
                    key = (key_node.tag, key_node.value)
                    line = key_node.start_mark.line + 1
                    if key in seen:
                        self.duplicates.append((key_node.value, seen[key], line))
                    else:
                        seen[key] = line
            return super().construct_mapping(node, deep)

    def _construct_int(loader, node):
        if len(node.value) > NUMBER_CHARS_LIMIT:
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {len(node.value)} characters: too long", node.start_mark)
        return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)

    Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
    return {"yaml": yaml, "SAFE_LOADER": safe_loader, "Loader": Loader}


def _children(node) -> list:
    yaml = _yaml()["yaml"]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_aliases(root, label: str) -> None:
    """Refuse a node graph whose aliases expand it by more than ALIAS_NODES_LIMIT nodes,
    or that holds an alias inside the node it names. Linear in the distinct nodes."""
    sizes: dict[int, int] = {}  # id(node) -> its node count with aliases expanded
    entered: set[int] = set()  # on the current path
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            entered.discard(key)
            continue
        if key in sizes:
            continue
        if key in entered:
            raise ConfigError(f"{label}: a YAML alias inside the node it names (recursive): refused")
        entered.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))
    if sizes[id(root)] - len(sizes) > ALIAS_NODES_LIMIT:
        raise ConfigError(f"{label}: YAML aliases expand the document by more than {ALIAS_NODES_LIMIT} nodes "
                          "(an alias bomb?): refused")


def _yaml_load(text: str, label: str) -> tuple[Any, list]:
    """yaml.load(text, Loader=SAFE_LOADER), bounded; (document, keys given twice)."""
    loader = _yaml()["Loader"](text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        if "*" in text:  # an alias needs one
            _check_aliases(node, label)
        return loader.construct_document(node), loader.duplicates
    finally:
        loader.dispose()


def _json_load(text: str) -> tuple[Any, list]:
    duplicates: list[tuple[Any, int, int]] = []

    def pairs(items):
        doc = dict(items)
        if len(doc) != len(items):
            seen: set = set()
            duplicates.extend((k, 0, 0) for k, _ in items if k in seen or seen.add(k))
        return doc

    return json.loads(text, object_pairs_hook=pairs), duplicates


def _parse_text(text: str, label: str, duplicates: list | None = None) -> Any:
    """The document in `text`, exactly as `yaml.load(text, Loader=SAFE_LOADER)` has it;
    `label` ("config file /etc/...") starts the error message. A key given twice in one
    mapping is an error, unless `duplicates` is a list: then a phrase for each is added to
    it (the last one counts, as in PyYAML, go-yaml and Go's JSON decoder)."""
    doc, twice = _parse(text, label)
    for key, first, second in twice:
        where = f" (lines {first} and {second})" if first else ""
        if duplicates is None:
            raise ConfigError(f"{label}: key {inputs.show(key)} is given twice in one mapping{where}: keep one")
        duplicates.append(f"key {inputs.show(key)} is given twice{where}")
    return doc


def _parse(text: str, label: str) -> tuple[Any, list]:
    if text.lstrip().startswith("{"):
        try:  # JSON is YAML, and json parses a 100,000-prefix list fifty times faster
            return _json_load(text)
        except (ValueError, RecursionError):
            pass  # YAML flow style that is not JSON (or a number json will not take: YAML says why)
    # Before PyYAML is imported: a short text of the usual shape (plain.py), a long one
    # with its long lists cut out (the fast path, which reads what is left with plain.py
    # where it can, and catches what libyaml raises on it)
    doc = read_plain(text) if text.count("\n") < FAST_YAML_MIN_ITEMS else _yaml_fast(text)
    if doc is not None:
        return doc, []
    yaml = _yaml()["yaml"]
    try:
        return _yaml_load(text, label)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{label}: not valid YAML{at}: {inputs.cut(str(problem))}") from None
    except RecursionError:
        raise ConfigError(f"{label}: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a date that is not (2001-02-30)
        raise ConfigError(f"{label}: a value YAML cannot build: {inputs.cut(str(exc))}") from None


# ------------------------------------------------------------- the YAML fast path
# libyaml takes 0.35 s for a list of 100,000 prefixes written one a line, nearly all of
# it building the list (this path: 0.025 s; measured again 2026-12-05 on a loaded machine:
# 1.72 s against 0.025 s). It stays because that is the whole budget of a one-prefix
# change at 100,000 (0.3 s), and ip-masq-agent files are YAML, written one a line. Such a list is cut out of the text here, the rest (other keys,
# comments) is left to libyaml with a placeholder where the list was, and the list is
# put back into what libyaml returns. A list is cut only where its meaning is beyond
# doubt: the whole value of a top-level `key:` (nothing after the colon but a comment),
# every item a plain `- 10.0.0.0/24` (hex digits, ':' and '.', then '/' and a length: a
# plain scalar that YAML 1.1 can only read as a string) at one indentation, between
# them only blank lines and comments, and after it a line that starts a new top-level
# key. libyaml then checks that every placeholder came back as the plain value of a
# top-level key on its line, in a block mapping, with no key twice. Anything else, or
# any error (libyaml's, on the whole text, says what it is), is left to libyaml whole.

FAST_YAML_MIN_ITEMS = 256  # shorter lists are not worth it
_FAST_SCALAR = r"[0-9A-Fa-f:.]+/[0-9]{1,3}"
_FAST_COMMENT = r"#[\x20-\x7e]*"  # printable ASCII: no line break libyaml sees, no control character
_FAST_KEY = (  # (compiled when first needed: a short file never needs it)
    rf"^([A-Za-z0-9_][A-Za-z0-9_.-]*):((?:[ ]+{_FAST_COMMENT})?)[ ]*\n"  # `key:`, maybe a comment
    rf"(?=(?:[ ]*(?:{_FAST_COMMENT})?\n)*([ ]{{0,8}})- {_FAST_SCALAR}(?:[ \n]|\Z))"  # then a list item
)
_FAST_BODY: dict[str, tuple[re.Pattern, re.Pattern]] = {}  # indentation -> (plain lines, all lines)
_FAST_ITEM = rf"^[ ]*- ({_FAST_SCALAR})"
_FAST_PLACEHOLDER = "ipmasq-legacy-fast-yaml-list-"
_FAST_STR_TAG = "tag:yaml.org,2002:str"


def _fast_body(indent: str) -> tuple[re.Pattern, re.Pattern]:
    """The lines of a list at `indent`: those that are just `- item`, and all it may have
    (items with trailing spaces or a comment, blank lines, comments)."""
    if indent not in _FAST_BODY:
        plain = rf"{indent}- {_FAST_SCALAR}\n"
        item = rf"{indent}- {_FAST_SCALAR}(?:[ ]+{_FAST_COMMENT})?[ ]*"
        blank = rf"[ ]*(?:{_FAST_COMMENT})?"
        # (plain)+ first: sre runs through a plain stretch seven times faster that way
        more = prefixes.POSSESSIVE  # keep no state per line (20 MB at 100,000)
        _FAST_BODY[indent] = (re.compile(rf"(?:{plain})*{more}"),
                              re.compile(rf"(?:(?:{plain})+{more}|{item}(?:\n|\Z)|{blank}\n)*{more}(?:{blank}\Z)?"))
    return _FAST_BODY[indent]


def _match_end(pattern: re.Pattern, text: str, pos: int) -> int:
    m = pattern.match(text, pos)  # the body patterns match the empty string too
    assert m is not None
    return m.end()


def _yaml_fast(text: str, min_items: int | None = None) -> Any:
    """`yaml.load(text, Loader=SAFE_LOADER)` with the long prefix lists cut out and read
    without libyaml; None when that does not apply (then libyaml reads the text whole)."""
    min_items = FAST_YAML_MIN_ITEMS if min_items is None else min_items
    if len(text) < 6 * min_items:
        return None
    pieces: list[str] = []  # the text libyaml reads
    lists: list[list[str]] = []
    copied = pos = 0  # text[:copied] is in pieces; the next `key:` is looked for from pos
    key_line = re.compile(_FAST_KEY, re.M)  # re's cache: compiled once
    while (m := key_line.search(text, pos)) is not None:
        indent = m.group(3)
        start = m.end()  # the line after `key:`
        plain, lines = _fast_body(indent)
        plain_end = _match_end(plain, text, start)
        pos = end = _match_end(lines, text, plain_end)  # no `key:` line in between
        if end < len(text) and not ("!" <= text[end] <= "~" and text[end] not in "-#"):
            continue  # what follows might belong to the list: leave it to libyaml
        lead = indent + "- "
        if plain_end > start and "- " not in text[plain_end:end]:  # all items `- item` lines, one after another
            items = text[start + len(lead):plain_end - 1].split("\n" + lead)
        else:
            items = re.compile(_FAST_ITEM, re.M).findall(text, start, end)
        if len(items) < min_items:
            continue
        pieces += [text[copied:m.end(1)], f": {_FAST_PLACEHOLDER}{len(lists)}{m.group(2)}\n"]
        lists.append(items)
        copied = end
    if not lists:
        return None
    pieces.append(text[copied:])
    placeholders = {f"{_FAST_PLACEHOLDER}{i}": items for i, items in enumerate(lists)}
    rest = "".join(pieces)  # what was cut out is printable ASCII: these checks can skip it
    if rest.count(_FAST_PLACEHOLDER) != len(lists) or any(c in rest for c in "&*!"):
        return None  # the text had the placeholder already; anchors, aliases, tags: not worth the thought
    # Only '\n' ends a line here; libyaml also ends one at these. And no document markers.
    if "\r" in rest or (not rest.isascii() and re.search("[\x85\u2028\u2029\ufeff]", rest)):
        return None
    if rest.startswith(("---", "...")) or "\n---" in rest or "\n..." in rest:
        return None
    # The rest, as short as a config without its long lists, is plain.py's when it can
    # read it (no PyYAML import: ~13 ms of CPU); every placeholder is then a key's value on
    # its own line, as libyaml is asked to check below.
    doc = read_plain(rest) if rest.count("\n") < FAST_YAML_MIN_ITEMS else None
    if doc is None:
        doc = _fast_rest(rest, placeholders)
    if doc is None:
        return None
    placed = 0
    for key, value in doc.items():
        if isinstance(value, str) and value in placeholders:
            doc[key] = placeholders[value]
            placed += 1
    return doc if placed == len(placeholders) else None


def _fast_rest(rest: str, placeholders: dict) -> dict | None:
    """libyaml's document of the text left when the long lists are cut out, where every
    placeholder came back as the plain value of a top-level key on its line; else None."""
    yaml = _yaml()["yaml"]
    try:
        loader = _yaml()["Loader"](rest)
        try:
            root = loader.get_single_node()
            if not isinstance(root, yaml.MappingNode) or root.flow_style:
                return None
            found = {
                value.value
                for key, value in root.value
                if isinstance(value, yaml.ScalarNode) and not value.style and value.tag == _FAST_STR_TAG
                and value.value in placeholders and key.start_mark.column == 0
                and key.start_mark.line == value.start_mark.line
            }
            if len(found) != len(placeholders):
                return None
            doc = loader.construct_document(root)
            if loader.duplicates:
                return None  # libyaml's path says which
        finally:
            loader.dispose()
    except Exception:  # a YAMLError, a RecursionError, a date that is not (2001-02-30): ValueError
        return None  # libyaml says it again, on the whole text
    if not isinstance(doc, dict) or len(doc) != len(root.value):
        return None  # a key twice (or a merge key): leave it to libyaml
    return doc
