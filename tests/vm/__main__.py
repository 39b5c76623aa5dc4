"""python -m tests.vm [--release R ...] [--suite full|focused] [--accel auto|kvm|tcg]

Runs the kernel matrix (see __init__.py) and prints one table; exit status 0 when
every release x backend passed (or is unavailable with doctor's reason and not picked
by auto), 1 otherwise, 2 for bad input or a missing tool.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from . import hostcfg, image, machine, results
from .releases import RELEASES, resolve

CHECKOUT = Path(__file__).resolve().parents[2]
NEEDED = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4", "git")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.vm", description=__doc__.splitlines()[0])
    p.add_argument("--release", action="append", default=[],
                   help="bullseye, bookworm, trixie (or 11, 12, 13); repeatable or comma-separated; default: all")
    p.add_argument("--suite", choices=("full", "focused"), default="full",
                   help="full: traffic, migration and ebpf tests; focused: the decision table (CI)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="auto: KVM when it boots the guest, else TCG")
    p.add_argument("--timeout", type=float, default=90, help="minutes per release, boot to power-off")
    p.add_argument("--script", metavar="FILE",
                   help="a bash script of the checkout to run in the guest after setup instead of the suite "
                        "(its output: script.log in --out); for looking into one kernel")
    p.add_argument("--keep", action="store_true", help="keep each run's overlay and payload (in --out)")
    p.add_argument("--out", type=Path, default=None,
                   help="where each release's logs go (default: $IPMASQ_VM_CACHE/last)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        releases = resolve([n for item in args.release for n in item.split(",") if n]) or list(RELEASES.values())
    except ValueError as exc:
        print(f"tests.vm: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("tests.vm: needs root (mmdebstrap builds the images as root)", file=sys.stderr)
        return 2
    missing = [t for t in NEEDED if shutil.which(t) is None]
    if missing:
        print(f"tests.vm: missing {', '.join(missing)}: run `bash scripts/setup-vm`", file=sys.stderr)
        return 2
    out_root = args.out or image.cache_root() / "last"
    env = {**hostcfg.environment(), "IPMASQ_VM_SUITE": args.suite}
    if args.script:
        script = Path(args.script).resolve()
        if not script.is_file() or CHECKOUT not in script.parents:
            print(f"tests.vm: --script {args.script}: not a file of the checkout {CHECKOUT}", file=sys.stderr)
            return 2
        env["IPMASQ_VM_SCRIPT"] = str(script.relative_to(CHECKOUT))
    rows, times = [], {}
    for release in releases:
        t0 = time.monotonic()
        out = out_root / release.codename
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        try:
            img = image.ensure(release, log=print)
        except (RuntimeError, OSError) as exc:
            print(f"{release.codename}: image build failed: {exc}")
            rows += results.rows(release.codename, out)
            times[release.codename] = f"{time.monotonic() - t0:.0f} s (no image)"
            continue
        built = time.monotonic() - t0
        machine.payload(CHECKOUT, out / "payload.tar", env)
        accels = {"auto": ["kvm", "tcg"] if machine.kvm_usable() else ["tcg"], "kvm": ["kvm"], "tcg": ["tcg"]}
        for accel in accels[args.accel]:
            what = f"script {args.script}" if args.script else f"suite {args.suite}"
            print(f"{release.codename}: booting {img.info['kernel_package']} ({accel}, {what})")
            run = machine.boot(img, out, accel, timeout=args.timeout * 60, log=print)
            if run.how != "did not boot":
                break
            print(f"{release.codename}: {accel} did not reach init in time" +
                  (": falling back to TCG" if accel == "kvm" and args.accel == "auto" else ""))
        if not args.keep:
            for name in ("overlay.qcow2", "payload.tar", "results.img"):
                (out / name).unlink(missing_ok=True)
        release_rows = results.rows(release.codename, run.results)
        rows += release_rows
        times[release.codename] = (f"{time.monotonic() - t0:.0f} s ({run.accel}, {run.how}; image "
                                   f"{'cached' if built < 5 else f'built in {built:.0f} s'})")
        print(results.render(release_rows, {release.codename: times[release.codename]}))
        print(f"{release.codename}: logs in {out}")
    print()
    print(results.render(rows, times))
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
