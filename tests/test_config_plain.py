"""config/plain.py (a short config of the usual shape, read without PyYAML) builds every
document exactly as libyaml does, or leaves it to libyaml. No root needed."""

from __future__ import annotations

import random

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ipmasq_legacy import config
from ipmasq_legacy.config import plain

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Scalars as configs hold them, and those YAML 1.1 reads as something else than a string
SCALARS = [
    "10.0.0.0/8", "fd00::/8", "2001:db8::/32", "2001:db8::1", "10.1.2.3", "eth0", "eth+", "cilium_host", "60s",
    "1m30s", "1.5s", "1024-65535", "2001-12-14", "2001-12-14 21:59:43.10 -5", "0", "7", "010", "0o7", "0x1F",
    "0b101", "1_000", "1e3", "1.5", ".5", ".inf", ".NaN", "1:30", "190:20:30", "-1", "+1", "~", "null", "Null",
    "NULL", "nul", "true", "True", "TRUE", "tRue", "false", "yes", "Yes", "YES", "no", "No", "on", "On", "ON", "off",
    "Off", "OFF", "y", "n", "Y", "auto", "nftables", "iptables-nft", "a:b", "http://x", "a/b", "_x", "x_",
    "'quoted'", '"double"', "''", '""', "'a b'", "'it''s'", '"a\\tb"', "a#b", "a #b", "&a x", "*a", "!!str x", "|",
    ">", "[a]", "{a: 1}", "-", "- x", "a: b", "a:", "@x", "`x", "%x", "<<", "=", "12345678901234567890123",
    "123456789012345678", "éth0", "a\tb", "x ",
]
USUAL = ["10.0.0.0/8", "fd00::/8", "2001:db8::/32", "eth0", "eth+", "60s", "false", "true", "nftables", "7"]
KEYS = ["ipv4-pod-cidr", "nonMasqueradeCIDRs", "masqLinkLocal", "resync-interval", "a.b", "yes", "on", "null",
        "1", "_k", "k", "'k'", "y", "K-1"]


def libyaml(text: str):
    """("doc", the document) or ("error", None), as the loader without plain.py has it."""
    loader = config.text.Loader(text)
    try:
        doc = loader.get_single_data()
        return ("error", None) if loader.duplicates else ("doc", doc)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError):
        return "error", None
    finally:
        loader.dispose()


def same(text: str) -> None:
    got = plain.read(text)
    if got is None:
        return  # left to libyaml
    want = libyaml(text)
    assert want == ("doc", got), text
    assert [type(v) for v in got.values()] == [type(v) for v in want[1].values()], text


def random_text(rng: random.Random) -> str:
    def scalar():
        return rng.choice(USUAL) if rng.random() < 0.8 else rng.choice(SCALARS)

    lines = []
    for _ in range(rng.randint(0, 6)):
        key = rng.choice(KEYS[:5]) if rng.random() < 0.8 else rng.choice(KEYS)
        shape = rng.choice([0, 0, 1, 1, 2, 2, 2, 3, 4, 5])
        comment = rng.choice(["", "", " # c", "# c", "  #c"])
        if shape == 0:
            lines.append(f"{key}: {scalar()}{comment}")
        elif shape == 1:
            items = ", ".join(scalar() for _ in range(rng.randint(0, 3)))
            lines.append(f"{key}: [{items}]{comment}")
        elif shape == 2:
            lines.append(f"{key}:{comment}")
            indent = " " * rng.choice([0, 0, 2, 4])
            for _ in range(rng.randint(0, 4)):
                lines.append(rng.choice([f"{indent}- {scalar()}", f"{indent}-  {scalar()}",
                                         "", "# between", f"{indent}  # between", f"{indent}-{scalar()}",
                                         f"{indent} - {scalar()}", f"  {scalar()}"]))
        elif shape == 3:
            lines.append(rng.choice(["", "# comment", "   ", "---", "...", "%YAML 1.1", "  indented: x",
                                     f"- {scalar()}"]))
        elif shape == 4:
            lines.append(f"{key}:")
            lines.append(f"  {rng.choice(KEYS)}: {scalar()}")
        else:
            lines.append(f"{key}:{scalar()}")
    return "\n".join(lines) + rng.choice(["", "\n", "\n\n", " "])


def test_generated_texts_read_as_libyaml_reads_them():
    rng = random.Random(15)
    read = 0
    for _ in range(20_000):
        text = random_text(rng)
        same(text)
        read += plain.read(text) is not None
    assert read > 1_000  # the usual shapes are read here


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab01:/.- \n#[],'\"yesnotru", max_size=60))
def test_any_text_reads_as_libyaml_reads_it(text):
    same("k: " + text)
    same(text)


@pytest.mark.parametrize("text, doc", [
    ("ipv4-pod-cidr: [10.244.0.0/16]\nipv4-native-routing-cidr:\n  - 10.1.0.0/16\n  - fd00::/8  # v6\n",
     {"ipv4-pod-cidr": ["10.244.0.0/16"], "ipv4-native-routing-cidr": ["10.1.0.0/16", "fd00::/8"]}),
    ("nonMasqueradeCIDRs:\n- 10.0.0.0/8\nmasqLinkLocal: false\nresyncInterval: 60s\n",
     {"nonMasqueradeCIDRs": ["10.0.0.0/8"], "masqLinkLocal": False, "resyncInterval": "60s"}),
    ("datapath: nftables\negress-masquerade-interfaces: eth+\nmasquerade-to-ports: 1024-65535\nport: 7\n",
     {"datapath": "nftables", "egress-masquerade-interfaces": "eth+", "masquerade-to-ports": "1024-65535", "port": 7}),
    ("a:\nb: ~\n", None),  # '~': left to libyaml
])
def test_usual_configs(text, doc):
    assert plain.read(text) == doc
    if doc is not None:
        assert yaml.load(text, Loader=LOADER) == doc
