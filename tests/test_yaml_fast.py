"""The YAML fast path (long prefix lists cut out, the rest to libyaml) reads every
document exactly as libyaml does, or leaves it to libyaml. No root needed."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipmasq_legacy import config
from ipmasq_legacy.errors import ConfigError


def libyaml(text: str):
    """What the config loader makes of a text without the fast path: the document, or the
    ConfigError message (JSON first; libyaml with keys given twice refused)."""
    if text.lstrip().startswith("{"):
        try:
            return "doc", config.json.loads(text)
        except ValueError:
            pass
    try:
        # libyaml, noting keys given twice (an error in this tool's config: README "Configuration")
        loader = config.text.Loader(text)
        try:
            doc = loader.get_single_data()
        finally:
            loader.dispose()
        if loader.duplicates:
            key, first, second = loader.duplicates[0]
            return "error", f"f.yaml: key {key!r} is given twice in one mapping (lines {first} and {second}): keep one"
        return "doc", doc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        return "error", f"f.yaml: not valid YAML{at}: {problem}"
    except RecursionError:
        return "error", "f.yaml: nested too deeply"
    except (ValueError, TypeError, OverflowError) as exc:  # a date that is not (2001-02-30): one line too
        return "error", f"f.yaml: a value YAML cannot build: {exc}"
    except Exception as exc:  # what the loader lets through
        return "raises", repr(exc)


def loaded(text: str):
    try:
        return "doc", config._parse_text(text, "f.yaml")
    except ConfigError as exc:
        return "error", str(exc)
    except Exception as exc:
        return "raises", repr(exc)


def same(got, want) -> bool:
    """Equal, and of the same types all the way down (1 == True == 1.0 is not enough)."""
    return repr(got) == repr(want)


# ------------------------------------------------------------- generated documents

v4 = st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=4), st.integers(0, 32))
v6 = st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=6), st.integers(0, 128))
# look like CIDRs, or nearly, but are something else to YAML, or not plain, or not one scalar
odd_item = st.sampled_from([
    "1:20", "1:20:30", "1.5", "12", "0x1F", "0o17", "1_000", ".inf", "yes", "null", "~", "2001-12-14",
    "10.0.0.0", "10.0.0.0/8#c", "10.0.0.0/8/8", "10.0.0.0/1234", "10.0.0.0 /8", "10.0.0.0/ 8",
    "'10.0.0.0/8'", '"10.0.0.0/8"', '"10.0.0.0/8', "&a 10.0.0.0/8", "*a", "!!str 10.0.0.0/8",
    "!!int 10", "[10.0.0.0/8]", "{a: 10.0.0.0/8}", "a: 10.0.0.0/8", "10.0.0.0/8:", "10.0.0.0/8: x",
    "- 10.0.0.0/8", "-10.0.0.0/8", "? 10.0.0.0/8", "|", ">", "|\n    text", "10.0.0.0/8\n    more",
    "10.0.0.0/8\t", "\t10.0.0.0/8", "10.0.0.0/8 # é", "10.0.0.0/8\r", "10.0.0.0/8\u2028x", "",
    "::/0", ":/8", ".5/8", "1:2/3", "fe80::/10", "FE80::/10", "::ffff:1.2.3.4/128", "%/8", "ipmasq-legacy-fast-yaml-list-0",
])
item = st.one_of(v4, v4, v4, v6, odd_item)
tame_trailer = st.sampled_from(["", "", "", "  ", " # a comment", "   #c", " #"])
odd_trailer = st.sampled_from(["#c", " # é", "\t", " # x\x01", "\r", " #\u2028- 1.0.0.0/8"])
other_line = st.sampled_from([
    "#é", "\t# tab", "# - 10.0.0.0/8", "---", "...", "--- ", "%YAML 1.1", "\r", "\ufeff", "\x01", "  #\x7f",
])


def sometimes(draw, wild: bool, usual, unusual, odds: int = 6):
    """Mostly `usual`, one time in `odds` `unusual`; always `usual` in a tame document."""
    return draw(unusual if wild and draw(st.integers(1, odds)) == 1 else usual)


@st.composite
def run_block(draw, wild: bool) -> str:
    """`key:` and a list under it: mostly well-formed, sometimes not at all."""
    key = sometimes(draw, wild, st.sampled_from(["ipv4-native-routing-cidr", "nonMasqueradeCIDRs", "a", "b"]),
                    st.sampled_from(["yes", "1", "null", "k.x", "-k", "ké", "? q", "a b", "'q'", "ipv4-pod-cidr"]))
    after = sometimes(draw, wild, st.sampled_from(["", "", "", " # comment", "  "]),
                      st.sampled_from([" x", "#c", " &anchor", " !!seq", " |", " []", " # é", "\t"]))
    key += draw(st.sampled_from(["", "", "-1", "-2", "-3", "-4", "-5"]))  # a key twice now and then
    indent = draw(st.sampled_from(["", "  ", "  ", " ", "    ", "         "]))
    lines = [f"{key}:{after}"]
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 29 if wild else 26))
        if kind <= 23:
            lines.append(f"{indent}- {sometimes(draw, wild, st.one_of(v4, v4, v6), odd_item, 12)}"
                         f"{sometimes(draw, wild, tame_trailer, odd_trailer, 4)}")
        elif kind <= 26:
            lines.append(sometimes(draw, wild, st.sampled_from(["", "  ", "# comment", "  # comment", "   #"]), other_line))
        elif kind == 27:  # the odd line: another indentation, another dash
            ind = draw(st.sampled_from(["", " ", "   ", "\t", "      "]))
            dash = draw(st.sampled_from(["- ", "-", "-  ", "-\t"]))
            lines.append(f"{ind}{dash}{draw(item)}")
        else:  # a nested key, or a continuation
            lines.append(draw(st.sampled_from([f"{indent}  x: 1", f"{indent}  more", f"{indent}k: v", "  - - 1.0.0.0/8"])))
    return "\n".join(lines)


usual_block = st.sampled_from([
    "datapath: iptables", "enable-ipv4-masquerade: yes", "a: 1", "b: 1.5", "c: ~", "d: 2001-12-14",
    "ipv4-pod-cidr: [10.244.0.0/16]", "e: [1, 2,\n  3]", "f: {x: 1,\n  y: 2}", "g: 'quoted\n  on two lines'",
    'h: "a\n\n  b"', "i: |\n  block\n  text\n", "j: >-\n  folded\n", "k:\n  nested: 1\n  deeper:\n    - 1",
    "l:\n- 1\n- 2", "? complex\n: value", "q:", "u: 1 # comment", "ipv4-native-routing-cidr: 10.0.0.0/8",
    "# just a comment", "", "i2: |+\n  kept\n\n", "i3: |\n  block\n#after",
])
unusual_block = st.sampled_from([
    "m: &anchor 1", "n: *anchor", "o: !!str 5", "<<: {p: 1}", "r: [", "s: ]", "  indented: 1", "\tt: 1",
    "a: again", "v: 'ipmasq-legacy-fast-yaml-list-0'", "w: ipmasq-legacy-fast-yaml-list-1", "---", "...", "--- |",
    "%YAML 1.1\n---", "- top level item", "x: \"\\u2028\"", "y: \x85", "z: 1\r\nzz: 2", "{a: 1}", "[1, 2]",
    "a: [\n", "g: 'open quote", "h: \"open\n", "bad-date: 2001-02-30", "deep: " + "[" * 2000 + "]" * 2000,
])


@st.composite
def document(draw) -> str:
    wild = draw(st.integers(0, 2)) == 0  # a third of them may have anything anywhere
    n = draw(st.integers(1, 6))
    blocks = [draw(run_block(wild)) if draw(st.booleans()) else sometimes(draw, wild, usual_block, unusual_block, 8)
              for _ in range(n)]
    text = "\n".join(blocks)
    return text + draw(st.sampled_from(["\n", "\n", "", "\n\n", "\n# end\n", "\n  "]))


# 2,500 examples took 45 s of every suite run; the full count runs with the reliability suite
EXAMPLES = 2500 if os.environ.get("IPMASQ_RELIABILITY") == "full" else 300


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document())
def test_fast_path_reads_what_libyaml_reads(text):
    want = libyaml(text)
    fast = config._yaml_fast(text, min_items=1)
    if fast is not None:
        assert want[0] == "doc", f"fast path took {text!r}, which libyaml refuses: {want[1]}"
        assert same(fast, want[1]), f"{text!r}: {fast!r} != {want[1]!r}"
    with mock.patch.object(config, "FAST_YAML_MIN_ITEMS", 1):
        got = loaded(text)
    assert got[0] == want[0] and same(got[1], want[1]), f"{text!r}: {got!r} != {want!r}"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(v4, v6), min_size=1, max_size=40), st.sampled_from(["", " ", "  ", "    "]),
       st.lists(st.sampled_from(["", "# c", "  # c", "   "]), max_size=3), st.booleans())
def test_fast_path_taken_for_plain_lists(items, indent, interludes, final_newline):
    """The well-formed lists are cut out (so the fast path cannot quietly stop working)."""
    lines = ["ipv4-pod-cidr: [10.244.0.0/16]", "ipv4-native-routing-cidr: # the big one"]
    for i, cidr in enumerate(items):
        lines.append(f"{indent}- {cidr}" + (" # why" if i % 7 == 3 else ""))
        if i == len(items) // 2:
            lines += interludes
    lines += ["datapath: iptables", "nonMasqueradeCIDRs:", *[f"- {c}" for c in items]]
    text = "\n".join(lines) + ("\n" if final_newline else "")
    want = yaml.load(text, Loader=config.SAFE_LOADER)
    fast = config._yaml_fast(text, min_items=1)
    assert fast is not None, text
    assert same(fast, want)


def big_list(n: int, indent: str = "  ") -> str:
    return "".join(f"{indent}- {20 + i // 65536}.{i // 256 % 256}.{i % 256}.0/24\n" for i in range(n))


def test_fast_path_taken_for_a_long_list(tmp_path, monkeypatch):
    text = "ipv4-pod-cidr: [10.244.0.0/16]\nipv4-native-routing-cidr:\n" + big_list(5000)
    want = yaml.load(text, Loader=config.SAFE_LOADER)
    assert config.FAST_YAML_MIN_ITEMS <= 5000
    fast = config._yaml_fast(text)
    assert fast is not None and same(fast, want)

    def whole_text_refused(*args, **kwargs):
        raise AssertionError("libyaml was given the whole text")

    monkeypatch.setattr(config.yaml, "load", whole_text_refused)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = config.load(str(path))
    assert [str(p) for p in cfg.ipv4_native_routing_cidr] == want["ipv4-native-routing-cidr"]
    assert [str(p) for p in cfg.ipv4_pod_cidr] == ["10.244.0.0/16"]


def test_short_lists_left_to_libyaml():
    text = "ipv4-native-routing-cidr:\n" + big_list(config.FAST_YAML_MIN_ITEMS - 1)
    assert config._yaml_fast(text) is None


@pytest.mark.parametrize("text", [
    "k: &a 1\nipv4-native-routing-cidr:\n" + big_list(300),  # an anchor
    "ipv4-native-routing-cidr:\n" + big_list(300) + "ipv4-native-routing-cidr: []\n",  # a key twice
    "ipv4-native-routing-cidr: []\nipv4-native-routing-cidr:\n" + big_list(300),
    "ipv4-native-routing-cidr:\n" + big_list(300) + "  - '10.0.0.0/8'\n",  # a quoted item
    "ipv4-native-routing-cidr:\n" + big_list(300) + "   - 10.0.0.0/8\n",  # another indentation
    "ipv4-native-routing-cidr:\n" + big_list(300) + "  - 10.0.0.0/8\r\n",  # a carriage return
    "ipv4-native-routing-cidr:\n" + big_list(300).replace("\n", "\r\n"),
    "---\nipv4-native-routing-cidr:\n" + big_list(300),  # a document marker
    "ipv4-native-routing-cidr:\n" + big_list(300) + "...\n",
    "a:\n  ipv4-native-routing-cidr:\n" + big_list(300, "    "),  # not top level
    "a: [\nipv4-native-routing-cidr:\n" + big_list(300) + "]\n",  # inside a flow collection
    "a: \"\nipv4-native-routing-cidr:\n" + big_list(300) + "\"\n",  # inside a quoted scalar
    "ipv4-native-routing-cidr:\n" + big_list(300) + "  more: 1\n",
    "ipv4-native-routing-cidr:\n" + big_list(300) + "- 10.0.0.0/8\n",
    "ipv4-native-routing-cidr:\n" + big_list(300) + "a: [\n",  # an error after the list
    "ipv4-native-routing-cidr:\n" + big_list(300) + "\ta: 1\n",
    "ipv4-native-routing-cidr:\n" + big_list(300) + "  # \x01 control character\n",
])
def test_unusual_documents_left_to_libyaml(text):
    assert config._yaml_fast(text) is None
    assert same(loaded(text), libyaml(text))


def test_errors_unchanged_with_a_long_list():
    text = "ipv4-native-routing-cidr:\n" + big_list(300) + "datapath: [unclosed\n"
    kind, message = loaded(text)
    assert kind == "error" and message == libyaml(text)[1] and "at line 303" in message
