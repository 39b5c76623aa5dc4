"""The config and its key table: Cilium's agent option names (docs/spec.md section 1).

Every input shape (this tool's file, Cilium's values.yaml and cilium-config, the command
line) is turned into entries in these names first; `apply_layer` then reads one layer of
entries over the layers below it: default < file < options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError
from ..ruledata import DEFAULTS
from . import values as v
from .masqagent import MasqAgentConfig
from .values import ConfigWarning, _show


@dataclass(frozen=True)
class Config:
    enable_ipv4_masquerade: bool = True
    enable_ipv6_masquerade: bool = True
    egress_masquerade_interfaces: tuple = ()
    ipv4_native_routing_cidr: tuple = ()
    ipv6_native_routing_cidr: tuple = ()
    ipv4_pod_cidr: tuple = ()
    ipv6_pod_cidr: tuple = ()
    enable_ip_masq_agent: bool = False
    ip_masq_agent_config_path: str = DEFAULTS["ip_masq_agent_config_path"]
    datapath: str = "auto"
    iptables_random_fully: bool = False
    masquerade_to_ports: tuple = ()
    # README "The decision": destinations masqueraded even inside a wider exempt
    # prefix; masquerade only to these; SNAT to this address on this out-interface.
    force_masquerade_cidrs: tuple = ()
    masquerade_only_cidrs: tuple = ()
    egress_masquerade_addresses: tuple = ()  # ((pattern, address), ...)
    # README "The ebpf backend: when to choose it": false = the ebpf backend's fast path (conntrack skips the flows its
    # tc programs translate: README "The ebpf backend").
    ebpf_conntrack: bool = True
    # Loaded from ip_masq_agent_config_path when enable_ip_masq_agent is on, or inline
    # (Helm's ipMasqAgent.config): then no file is read.
    masq_agent: MasqAgentConfig | None = None
    ip_masq_agent_inline: bool = False
    source: str = "<defaults>"
    shape: str = "defaults"  # ipmasq-legacy, helm-values, cilium-config or defaults
    warnings: tuple = ()  # ConfigWarnings, the ip-masq-agent file's included


# key -> (Config field, parser). Options on the CLI carry the same names.
KEYS: dict[str, tuple[str, Callable]] = {
    "enable-ipv4-masquerade": ("enable_ipv4_masquerade", v.parse_bool),
    "enable-ipv6-masquerade": ("enable_ipv6_masquerade", v.parse_bool),
    "egress-masquerade-interfaces": ("egress_masquerade_interfaces", v.parse_interfaces),
    "ipv4-native-routing-cidr": ("ipv4_native_routing_cidr", lambda x, w: v.parse_networks(x, w, 4)),
    "ipv6-native-routing-cidr": ("ipv6_native_routing_cidr", lambda x, w: v.parse_networks(x, w, 6)),
    "ipv4-pod-cidr": ("ipv4_pod_cidr", lambda x, w: v.parse_networks(x, w, 4)),
    "ipv6-pod-cidr": ("ipv6_pod_cidr", lambda x, w: v.parse_networks(x, w, 6)),
    "enable-ip-masq-agent": ("enable_ip_masq_agent", v.parse_bool),
    "ip-masq-agent-config-path": ("ip_masq_agent_config_path", v.parse_path),
    "datapath": ("datapath", v.parse_datapath),
    "iptables-random-fully": ("iptables_random_fully", v.parse_bool),
    "masquerade-to-ports": ("masquerade_to_ports", v.parse_port_ranges),
    "force-masquerade-cidrs": ("force_masquerade_cidrs", lambda x, w: v.parse_networks(x, w)),
    "masquerade-only-cidrs": ("masquerade_only_cidrs", lambda x, w: v.parse_networks(x, w)),
    "egress-masquerade-addresses": ("egress_masquerade_addresses", v.parse_snat_addresses),
    "ebpf-conntrack": ("ebpf_conntrack", v.parse_bool),
}

# More of Cilium's option names, with the meaning they have in Cilium (README: Compatibility).
ALIASES = {
    "enable-bpf-masquerade": "true: datapath ebpf (Cilium's BPF masquerading)",
    "bpf-masquerade": "the same (the name this tool's first README used)",
    "native-routing-cidr": "ipv4-native-routing-cidr (its name before Cilium 1.11)",
    "masquerade": "enable-ipv4-masquerade (its name before Cilium 1.10)",
    "enable-ipv4": "false: no IPv4 is masqueraded (Cilium then runs no IPv4 at all)",
    "enable-ipv6": "false: no IPv6 is masqueraded",
    "devices": "with enable-bpf-masquerade, the interfaces masqueraded on (Cilium masquerades on its devices then)",
}
CLI_ALIASES = ("bpf-masquerade", "enable-bpf-masquerade")  # also command-line options

# Options that would change masquerading in a way this tool does not do: their off value
# is accepted (a cilium-config spells every option out), anything else is an error.
UNSUPPORTED = {
    "enable-masquerade-to-route-source": "the source becomes the out-interface's primary address, never a "
                                         "route's source address",
    "derive-masquerade-ip-addr-from-device": "Cilium takes that device's address whichever link a packet leaves "
                                             "by; here the address must be on the out-link: give it in "
                                             "egress-masquerade-addresses",
    "enable-ipv4-egress-gateway": "egress gateway policies are Cilium's; there is no per-pod gateway here",
    "enable-egress-gateway": "egress gateway policies are Cilium's; there is no per-pod gateway here",
}

KNOWN = list(KEYS) + sorted(ALIASES) + sorted(UNSUPPORTED)

Entry = tuple  # (key in Cilium's agent names, value, the key as the document spells it)


def _unknown(key: Any, known, where: str) -> ConfigError:
    import difflib  # only for an unknown key: not on every run's imports

    hint = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"{where}: unknown key {_show(key)}{suggestion}")


def _unsupported(key: str, value: Any, where: str) -> None:
    if key == "derive-masquerade-ip-addr-from-device":
        on = value not in (None, "")
    else:
        on = v.parse_bool(value, where)
    if on:
        raise ConfigError(f"{where}: {_show(value)} is not supported by ipmasq-legacy ({UNSUPPORTED[key]}); "
                          "remove it or turn it off")


def apply_layer(values: dict, entries: list[Entry], origin: str, strict: bool, notes: list) -> list[str]:
    """Read one layer of entries (a document, the command line) over `values` (Config field ->
    value). `origin` is "in FILE" or "on the command line". A key this tool does not know
    is an error when `strict`; else it is returned (the caller warns about them at once)."""
    local: dict[str, Any] = {}
    by: dict[str, str] = {}  # Config field -> the key that set it in this layer

    def put(attr: str, value: Any, shown: str) -> None:
        if attr in local and local[attr] != value:
            raise ConfigError(f"key {shown!r} {origin}: {_show(value)} contradicts key {by[attr]!r}, which says "
                              f"{_show(local[attr])}")
        local[attr], by[attr] = value, shown

    unknown: list[str] = []
    bpf = devices = None
    family_off = []
    for key, value, shown in entries:
        where = f"key {shown!r} {origin}"
        if key in KEYS:
            attr, parser = KEYS[key]
            put(attr, parser(value, where), shown)
        elif key in ("enable-bpf-masquerade", "bpf-masquerade"):
            on = v.parse_bool(value, where)
            if bpf is not None and bpf[0] != on:
                raise ConfigError(f"{where}: {_show(value)} contradicts key {bpf[1]!r}")
            bpf = (on, shown)
        elif key == "native-routing-cidr":
            put("ipv4_native_routing_cidr", v.parse_networks(value, where, 4), shown)
        elif key == "masquerade":
            put("enable_ipv4_masquerade", v.parse_bool(value, where), shown)
        elif key in ("enable-ipv4", "enable-ipv6"):
            if not v.parse_bool(value, where):
                family_off.append((key[-1], shown))
        elif key == "devices":
            devices = (v.parse_interfaces(value, where), shown)
        elif key in UNSUPPORTED:
            _unsupported(key, value, where)
        elif strict:
            raise _unknown(shown, KNOWN, f"config {origin.removeprefix('in ')}")
        else:
            unknown.append(shown)
    if bpf is not None:
        if bpf[0]:
            put("datapath", "ebpf", bpf[1])
        elif local.get("datapath") == "ebpf":
            raise ConfigError(f"key {bpf[1]!r} {origin}: false contradicts key {by['datapath']!r}, which says 'ebpf'")
    if devices is not None:
        names, shown = devices
        if not (bpf and bpf[0]):
            if strict:
                notes.append(ConfigWarning("no-effect", f"key {shown!r} {origin}: no effect without "
                                           "enable-bpf-masquerade: true (Cilium masquerades on its devices only then)"))
            else:
                unknown.append(shown)
        elif "egress_masquerade_interfaces" in local:
            notes.append(ConfigWarning("cilium-difference", f"key {shown!r} {origin}: egress-masquerade-interfaces "
                                       "is given too and is used; Cilium refuses the two together with BPF "
                                       "masquerading"))
        else:
            local["egress_masquerade_interfaces"] = names
    for family, _shown in family_off:  # Cilium masquerades no traffic of a family it does not run
        local[f"enable_ipv{family}_masquerade"] = False
    values.update(local)
    return unknown
