"""The guest's results (steps.tsv, doctor.json, junit.xml, versions.txt) -> rows of the
matrix, and the table.

A backend is `passed` when doctor finds it available, its selftest passes and none of
its tests fail; `unavailable` (also a pass, by the issue's definition) when doctor says
why it cannot run, `auto` does not pick it and nothing of it failed; else `failed`.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("iptables-legacy", "iptables-nft", "nftables", "ebpf")


@dataclass
class Row:
    release: str
    kernel: str
    backend: str
    doctor: str = "?"
    selftest: str = "-"
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    result: str = "failed"
    why: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result in ("passed", "unavailable")


def steps(out: Path) -> dict[str, tuple[int, int]]:
    """step name -> (exit status, seconds)."""
    found = {}
    path = out / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].lstrip("-").isdigit():
                found[parts[0]] = (int(parts[1]), int(parts[2]))
    return found


def backends_of(testcase: ET.Element) -> list[str]:
    """The backends a test is about: named in its parameters, or ebpf for test_ebpf."""
    name = testcase.get("name", "")
    params = name[name.find("[") + 1:] if "[" in name else ""
    found = [b for b in BACKENDS if re.search(rf"(?<![A-Za-z]){re.escape(b)}(?![A-Za-z])", params)]
    if not found and "test_ebpf" in testcase.get("classname", ""):
        found = ["ebpf"]
    return found


def junit(out: Path) -> dict[str, dict]:
    """backend -> {"passed", "failed", "skipped": counts, "failures": test names}."""
    tally = {b: {"passed": 0, "failed": 0, "skipped": 0, "failures": []} for b in (*BACKENDS, "(other)")}
    path = out / "junit.xml"
    if not path.exists():
        return tally
    for case in ET.parse(path).getroot().iter("testcase"):
        kind = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            kind = "failed"
        elif case.find("skipped") is not None:
            kind = "skipped"
        for backend in backends_of(case) or ["(other)"]:
            tally[backend][kind] += 1
            if kind == "failed":
                tally[backend]["failures"].append(case.get("name"))
    return tally


def rows(release: str, out: Path) -> list[Row]:
    st = steps(out)
    versions = (out / "versions.txt").read_text().splitlines() if (out / "versions.txt").exists() else []
    kernel = versions[0] if versions else "?"
    try:
        doctor = json.loads((out / "doctor.json").read_text())
    except (OSError, ValueError):
        doctor = {}
    auto = (doctor.get("auto") or {}).get("backend")
    if "script" in st and st.get("setup", (1, 0))[0] == 0:  # --script: its exit status is the result
        code = st["script"][0]
        return [Row(release, kernel, "(script)", doctor="-", result="passed" if code == 0 else "failed",
                    why=[] if code == 0 else [f"script exit {code} (script.log)"])]
    tally = junit(out)
    result = []
    names = list(BACKENDS) + (["(other)"] if sum(tally["(other)"][k] for k in ("passed", "failed")) else [])
    for backend in names:
        row = Row(release, kernel, backend)
        t = tally[backend]
        row.passed, row.failed, row.skipped = t["passed"], t["failed"], t["skipped"]
        row.why += [f"test failed: {n}" for n in t["failures"][:4]]
        if "setup" not in st or st["setup"][0] != 0:
            row.why.insert(0, "scripts/setup failed" if "setup" in st else "the guest did not run")
            result.append(row)
            continue
        if backend == "(other)":
            row.doctor = "-"
            row.result = "failed" if row.failed else "passed"
            result.append(row)
            continue
        status = doctor.get("backends", {}).get(backend)
        if status is None:  # doctor did not run or did not name it: nothing says why
            row.doctor = "?"
            row.why.insert(0, "doctor gave no verdict (doctor.log)")
            result.append(row)
            continue
        available = status == "available"
        row.doctor = "available" if available else "unavailable"
        rc = st.get(f"selftest-{backend}", (None, 0))[0]
        row.selftest = {None: "-", 0: "pass"}.get(rc, "FAIL")
        if available:
            ok = rc == 0 and row.failed == 0 and row.passed > 0
            if rc != 0:
                row.why.insert(0, f"selftest failed (selftest-{backend}.log)")
            row.result = "passed" if ok else "failed"
        else:
            row.why.insert(0, f"doctor: {status}")
            if auto == backend:
                row.why.append("auto picks it although doctor says it cannot run")
            row.result = "unavailable" if auto != backend and row.failed == 0 else "failed"
        result.append(row)
    return result


def render(all_rows: list[Row], times: dict[str, str]) -> str:
    head = ("release", "kernel", "backend", "doctor", "selftest", "tests p/f/s", "result")
    table = [head] + [(r.release, r.kernel, r.backend, r.doctor, r.selftest,
                       f"{r.passed}/{r.failed}/{r.skipped}", r.result) for r in all_rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.release} {r.backend}: {w}" for r in all_rows for w in r.why if not r.ok or r.result == "unavailable"]
    if notes:
        lines += ["", "why:"] + notes
    if times:
        lines += ["", "time per release: " + ", ".join(f"{k} {v}" for k, v in times.items())]
    bad = sum(1 for r in all_rows if not r.ok)
    lines.append(f"kernels: {len(all_rows) - bad} passed, {bad} failed")
    return "\n".join(lines)
