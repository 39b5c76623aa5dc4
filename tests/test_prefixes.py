"""The fast prefix parser agrees with ipaddress on everything, valid or not."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from ipmasq_legacy import prefixes

octet = st.one_of(st.integers(0, 255).map(str), st.sampled_from(["00", "010", "256", "-1", "", "1e1"]))
v4 = st.builds(lambda a, b, c, d: f"{a}.{b}.{c}.{d}", octet, octet, octet, octet)
v6 = st.one_of(
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.sampled_from(["::", "::1", "fe80::1%eth0", ":::", "1::2::3", "fd00::/8"]),
)
length = st.one_of(st.integers(0, 130).map(str), st.sampled_from(["08", "", "x", "255.0.0.0", "-1"]))
cidr = st.one_of(st.builds(lambda a, n: f"{a}/{n}", st.one_of(v4, v6), length), v4, v6, st.text(max_size=20))


def spelling(net) -> str:
    """ipaddress's text, with IPv4-mapped IPv6 addresses in hex words on every Python
    (3.13 spells them dotted; the plan keeps one spelling: set names digest it)."""
    if net.version == 6 and net.network_address.ipv4_mapped is not None:
        v = int(net.network_address)
        return f"::ffff:{v >> 16 & 0xFFFF:x}:{v & 0xFFFF:x}/{net.prefixlen}"
    return str(net)


def reference(text: str):
    """(canonical text, None) or (None, the network meant when only host bits were set, or 'error').
    One deliberate difference: a zone index (fe80::1%eth0) is refused."""
    if "%" in text:
        return None, "error"
    try:
        return spelling(ipaddress.ip_network(text, strict=True)), None
    except ValueError:
        try:
            return None, spelling(ipaddress.ip_network(text, strict=False))
        except ValueError:
            return None, "error"


@settings(max_examples=3000, deadline=None)
@given(cidr)
def test_parse_agrees_with_ipaddress(text):
    want, otherwise = reference(text)
    try:
        got = prefixes.parse(text)
    except prefixes.PrefixError as exc:
        assert want is None, f"{text!r}: rejected, ipaddress takes it as {want}"
        assert (exc.suggestion or "error") == otherwise
        return
    assert str(got) == want, f"{text!r}: {got} != {want}"


def test_suggestion_for_host_bits():
    try:
        prefixes.parse("10.0.0.1/8")
    except prefixes.PrefixError as exc:
        assert exc.suggestion == "10.0.0.0/8"
    else:
        raise AssertionError("host bits accepted")


# ------------------------------------------------------------- the batch and bulk paths


def normalise_as_it_was(prefixes_):
    """prefixes.normalise before it was made fast, kept as the oracle."""
    out = []
    for family in (4, 6):
        bits = prefixes._BITS[family]
        merged = []
        covered_to = -1
        for start, length in sorted((p.value, p.length) for p in prefixes_ if p.version == family):
            if start <= covered_to:
                continue
            merged.append((start, length))
            covered_to = start + (1 << (bits - length)) - 1
            while len(merged) >= 2:
                (s1, p1), (s2, p2) = merged[-2], merged[-1]
                size = 1 << (bits - p1)
                if p1 != p2 or p1 == 0 or s2 != s1 + size or s1 % (size << 1):
                    break
                merged[-2:] = [(s1, p1 - 1)]
        out += [prefixes.Prefix(family, start, length) for start, length in merged]
    return out


@st.composite
def clustered_prefix(draw, family: int) -> prefixes.Prefix:
    """Prefixes near each other (so they nest, touch and merge), now and then anywhere."""
    bits = prefixes._BITS[family]
    if draw(st.integers(0, 9)) == 0:
        length = draw(st.integers(0, bits))
        value = draw(st.integers(0, (1 << bits) - 1))
    else:
        base = 0xC0A80000 if family == 4 else 0x20010DB8 << 96
        length = draw(st.integers(bits - 6, bits))
        value = base + draw(st.integers(0, 63))
    value &= ~((1 << (bits - length)) - 1)
    return prefixes.Prefix(family, value, length)


prefix_lists = st.lists(st.one_of(clustered_prefix(4), clustered_prefix(4), clustered_prefix(6)), max_size=60)


@settings(max_examples=1000, deadline=None)
@given(prefix_lists)
def test_normalise_agrees_with_the_old_one_and_ipaddress(items):
    got = prefixes.normalise(items)
    assert got == normalise_as_it_was(items)
    assert all(type(p) is prefixes.Prefix for p in got)
    for family in (4, 6):
        networks = [ipaddress.ip_network(str(p)) for p in items if p.version == family]
        assert [str(p) for p in got if p.version == family] == [str(n) for n in ipaddress.collapse_addresses(networks)]


@settings(max_examples=300, deadline=None)
@given(st.lists(clustered_prefix(4), max_size=60).map(lambda ps: sorted(set(ps))))
def test_normalise_of_separate_prefixes_keeps_them(items):
    """The common case (no two touch): the quick check must not merge or lose any."""
    separate: list = []
    for p in items:
        if not separate or separate[-1].last + 1 < p.value:
            separate.append(p)
    assert prefixes.normalise(separate) == separate
    assert prefixes.normalise(list(reversed(separate))) == separate


@settings(max_examples=500, deadline=None)
@given(prefix_lists)
def test_texts_agree_with_str(items):
    assert prefixes.texts(items) == [str(p) for p in items]
    v4_only = [p for p in items if p.version == 4]
    assert prefixes.texts(v4_only) == [str(p) for p in v4_only]


canonical_v4 = clustered_prefix(4).map(str)
canonical_v6 = clustered_prefix(6).map(str)


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(canonical_v4, canonical_v4, canonical_v6, cidr, st.integers(0, 9)), max_size=8),
       st.sampled_from([4, 6]))
def test_parse_batch_agrees_with_parse(texts, version):
    got = prefixes.parse_batch(texts, version)
    if got is None:
        return  # declined: the caller parses one by one
    assert got == [prefixes.parse(t) for t in texts]
    assert all(type(p) is prefixes.Prefix and p.version == version for p in got)


@settings(max_examples=200, deadline=None)
@given(st.lists(canonical_v4, min_size=1, max_size=50), st.lists(canonical_v6, min_size=1, max_size=50))
def test_parse_batch_takes_plain_lists(v4_texts, v6_texts):
    assert prefixes.parse_batch(v4_texts, 4) == [prefixes.parse(t) for t in v4_texts]
    assert prefixes.parse_batch(v6_texts, 6) == [prefixes.parse(t) for t in v6_texts]
    assert prefixes.parse_batch(v4_texts + v6_texts[:1], 4) is None  # one of the other family
    assert prefixes.parse_batch(v4_texts[:-1] + [v4_texts[-1] + "\n" + v4_texts[0]], 4) is None
