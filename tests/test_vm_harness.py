"""The kernel matrix's harness (tests/vm) and the old-kernel/old-Python fixes it found,
without booting anything: result parsing, release names, the host guard's tolerance
of empty built-in tables, and the helpers that replaced 3.10+/5.11+ assumptions."""

from __future__ import annotations

import bisect
import ipaddress
import json

import pytest

from ipmasq_legacy import prefixes
from ipmasq_legacy.bpf import loader

from .conftest import _normalise
from .vm import releases, results


def test_release_names_and_numbers():
    assert [r.codename for r in releases.resolve(["11", "bookworm", "13"])] == ["bullseye", "bookworm", "trixie"]
    with pytest.raises(ValueError, match="unknown release 'buster'"):
        releases.resolve(["buster"])


def _out(tmp_path, steps, doctor, cases):
    (tmp_path / "steps.tsv").write_text("".join(f"{n}\t{rc}\t1\n" for n, rc in steps.items()))
    (tmp_path / "doctor.json").write_text(json.dumps(doctor))
    (tmp_path / "versions.txt").write_text("5.10.0-32-amd64\n")
    body = "".join(f'<testcase classname="tests.{cls}" name="{name}">{extra}</testcase>' for cls, name, extra in cases)
    (tmp_path / "junit.xml").write_text(f"<testsuites><testsuite>{body}</testsuite></testsuites>")
    return tmp_path


def test_rows_pass_fail_and_unavailable(tmp_path):
    out = _out(tmp_path,
               {"setup": 0, "selftest-iptables-legacy": 0, "selftest-iptables-nft": 0, "selftest-nftables": 0,
                "selftest-ebpf": 1},
               {"auto": {"backend": "nftables"},
                "backends": {"iptables-legacy": "available", "iptables-nft": "available", "nftables": "available",
                             "ebpf": "the kernel refuses BPF maps: not permitted"}},
               [("test_traffic", "test_decision_matches_spec[iptables-legacy-defaults]", ""),
                ("test_traffic", "test_decision_matches_spec[iptables-nft-defaults]", ""),
                ("test_traffic", "test_decision_matches_spec[nftables-defaults]", "<failure/>"),
                ("test_migration", "test_switch_under_traffic_never_leaks[iptables-legacy-iptables-nft]", ""),
                ("test_ebpf", "test_datapath", "<skipped/>")])
    rows = {r.backend: r for r in results.rows("bullseye", out)}
    assert rows["iptables-legacy"].result == "passed" and rows["iptables-legacy"].passed == 2
    assert rows["iptables-nft"].passed == 2
    assert rows["nftables"].result == "failed"
    assert rows["ebpf"].result == "unavailable" and rows["ebpf"].skipped == 1
    assert "kernels: 3 passed, 1 failed" in results.render(list(rows.values()), {})


def test_unavailable_but_picked_by_auto_fails(tmp_path):
    out = _out(tmp_path, {"setup": 0}, {"auto": {"backend": "nftables"}, "backends": {"nftables": "no nft"}}, [])
    row = next(r for r in results.rows("bullseye", out) if r.backend == "nftables")
    assert row.result == "failed" and any("auto picks it" in w for w in row.why)


@pytest.mark.parametrize("code, result", [(0, "passed"), (1, "failed")])
def test_a_script_run_is_judged_by_its_exit_status(tmp_path, code, result):
    """--script runs no doctor, selftest or suite: one row, the script's exit status."""
    (row,) = results.rows("trixie", _out(tmp_path, {"setup": 0, "script": code}, {}, []))
    assert (row.backend, row.result) == ("(script)", result)
    assert f"kernels: {1 - code} passed, {code} failed" in results.render([row], {})


def test_no_guest_run_is_a_failure(tmp_path):
    assert all(r.result == "failed" for r in results.rows("trixie", tmp_path))


def test_host_guard_ignores_empty_builtin_tables_only():
    empty = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    assert _normalise("iptables-legacy-save", "# Generated\n" + empty) == []
    leaked = [empty.replace("COMMIT", "-A INPUT -j DROP\nCOMMIT"),
              empty.replace(":FORWARD ACCEPT", ":FORWARD DROP"),
              empty.replace("COMMIT", ":IPMASQ-LEGACY - [0:0]\nCOMMIT")]
    for text in leaked:
        assert _normalise("iptables-legacy-save", text) != []
    assert _normalise("iptables-nft-save", empty) != []  # only the legacy tables are made by module loads


@pytest.mark.parametrize("keys", [[-1, -1, 0, 0, 1], [0], [1, 1], [-1], [], [-1, 0, 0, 0, 0, 1, 1]])
def test_bisect_left_matches_the_310_stdlib(keys):
    for target in (0, 1):
        for lo in range(len(keys) + 1):
            want = bisect.bisect_left(keys, target, lo=lo)
            assert loader._bisect_left(len(keys), target, keys.__getitem__, lo=lo) == want


def test_memlock_charged_before_511():
    assert loader.memlock_charged("5.10.0-32-amd64") and loader.memlock_charged("4.19.0")
    assert not loader.memlock_charged("5.11.0") and not loader.memlock_charged("6.12.118+deb13-amd64")


@pytest.mark.parametrize("text", ["::", "::1", "1::", "::ffff:0:0", "::ffff:a00:0", "::ffff:ffff:ffff",
                                  "1:0:0:2::3", "1::2:0:0:3", "2001:db8::1:0:0:1", "fe80::"])
def test_ipv6_spelling_does_not_depend_on_python(text):
    # Python before 3.13 spells these so; 3.13 spells IPv4-mapped ones dotted
    assert prefixes.v6_words(int(ipaddress.IPv6Address(text))) == text
    assert str(prefixes.parse(text + "/128")) == text + "/128"


def test_batch_fallback_starts_where_the_kernel_stopped():
    # LPM tries before 5.12 have no batch ops: ENOTSUPP with the count as asked (nothing
    # done; taking it as "all done" left Debian 11's exempt tries empty); a batch op that
    # fails part way writes back how many it did.
    import ctypes
    import struct

    attr = ctypes.create_string_buffer(loader.Sys.ATTR)
    struct.pack_into("=I", attr, 32, 5)
    assert loader._batch_done(attr, 5) == 0
    struct.pack_into("=I", attr, 32, 3)
    assert loader._batch_done(attr, 5) == 3
