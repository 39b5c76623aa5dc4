#!/usr/bin/env bash
# Runs inside the matrix's VM, as root, from the unpacked checkout (init.sh starts it).
# The steps a new user takes, each logged to /root/out/<step>.log and listed with its
# exit status and seconds in /root/out/steps.tsv; /root/out goes back to the host as
# a tar on /dev/vdc. IPMASQ_VM_SUITE: "full" (tox -e kernels) or "focused" (CI).
set -u
OUT=/root/out
mkdir -p "$OUT"
SUITE=${IPMASQ_VM_SUITE:-full}
# an emulated vCPU shared with the host's other work: probes that get nothing wait 3x longer
export IPMASQ_PROBE_TIMEOUT_SCALE=${IPMASQ_PROBE_TIMEOUT_SCALE:-3}
BACKENDS="iptables-legacy iptables-nft nftables ebpf"
T0=$(date +%s)

step() {  # step NAME COMMAND...: run, log, record; returns the command's status
    local name=$1 start rc
    shift
    start=$(date +%s)
    echo "ipmasq-vm: step $name"
    "$@" >"$OUT/$name.log" 2>&1 &
    local pid=$! waited=0
    while kill -0 "$pid" 2>/dev/null; do  # a line a minute, so a slow step shows it is alive
        sleep 5
        waited=$((waited + 5))
        if ((waited % 60 == 0)); then
            echo "ipmasq-vm: ... $name, $waited s: $(tail -c 2000 "$OUT/$name.log" | tr '\r' '\n' | grep -v '^$' | tail -n 1 | cut -c1-120)"
        fi
    done
    wait "$pid"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$OUT/steps.tsv"
    echo "ipmasq-vm: step $name exit $rc ($(($(date +%s) - start)) s) $(tail -n 1 "$OUT/$name.log" | cut -c1-160)"
    return $rc
}

finish() {
    {
        uname -r
        for tool in iptables nft; do "$tool" --version 2>&1 | head -n 1; done
        python3 --version
        clang --version 2>&1 | head -n 1
        .venv/bin/pip --version 2>&1
    } >"$OUT/versions.txt" 2>&1
    printf 'total\t0\t%s\n' "$(($(date +%s) - T0))" >>"$OUT/steps.tsv"
    sync
    tar -cf /dev/vdc -C "$OUT" . && sync
    echo "ipmasq-vm: results written"
    exit 0
}

case "$SUITE" in
    # test_decision_lpm: also multicast, which the host's kernel (no CONFIG_IP_MROUTE) cannot forward
    full) TESTS=(tests/test_traffic.py tests/test_migration.py tests/test_ebpf.py tests/test_decision_lpm.py) ;;
    # CI: the spec's decision table on every backend, and multicast never masqueraded
    focused) TESTS=(tests/test_traffic.py tests/test_decision_lpm.py
                    -k "test_decision_matches_spec or test_config_change or test_multicast_is_never_masqueraded") ;;
    *) echo "ipmasq-vm: unknown suite $SUITE"; finish ;;
esac

step setup env IPMASQ_SETUP_NEIGHBOURS=0 bash scripts/setup || finish  # the neighbours: no suite here runs them
if [ -n "${IPMASQ_VM_SCRIPT:-}" ]; then  # python -m tests.vm --script FILE: that instead of the suite
    step script bash "$IPMASQ_VM_SCRIPT"
    finish
fi
step doctor .venv/bin/ipmasq doctor
.venv/bin/ipmasq doctor -o json >"$OUT/doctor.json" 2>"$OUT/doctor-json.err"
for backend in $BACKENDS; do
    step "selftest-$backend" .venv/bin/ipmasq selftest --backend "$backend"
done
step pytest .venv/bin/python -m pytest -q -rA -p no:cacheprovider --junitxml="$OUT/junit.xml" "${TESTS[@]}"
finish
