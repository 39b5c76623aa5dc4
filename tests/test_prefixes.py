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


def reference(text: str):
    """(canonical text, None) or (None, the network meant when only host bits were set, or 'error').
    One deliberate difference: a zone index (fe80::1%eth0) is refused."""
    if "%" in text:
        return None, "error"
    try:
        return str(ipaddress.ip_network(text, strict=True)), None
    except ValueError:
        try:
            return None, str(ipaddress.ip_network(text, strict=False))
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
