"""Config -> Plan: the masquerade decision of docs/spec.md section 3 as plain data, per family.

No I/O here. Every backend renders the same Plan, so they cannot disagree on
what is masqueraded; they differ only in how they spell it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from . import prefixes, verdicts
from .config import Config
from .errors import ConfigError
from .links import matches
from .prefixes import Prefix
from .ruledata import DEFAULTS


@dataclass(frozen=True)
class FamilyPlan:
    """Masquerade packets of this family leaving through `interfaces` (empty: any but lo)
    from `sources` (empty: any source) unless the destination is local or in `exempt`."""

    family: int
    interfaces: tuple[str, ...]
    sources: tuple[str, ...]
    exempt: tuple[str, ...]
    random_fully: bool = False
    to_ports: tuple[tuple[int, int], ...] = ()
    # egress-masquerade-addresses of this family: (interface pattern, address), the most
    # specific pattern first; packets leaving such an interface are SNATed to the address.
    snat: tuple[tuple[str, str], ...] = ()

    def digest(self) -> str:
        """Stable short digest of the family's plan; names content-addressed objects."""
        fields = [self.family, self.interfaces, self.sources, self.exempt_digest(), self.random_fully, self.to_ports]
        blob = json.dumps(fields + ([self.snat] if self.snat else [])).encode()
        return hashlib.sha256(blob).hexdigest()

    def exempt_digest(self) -> str:
        return hashlib.sha256("\n".join(self.exempt).encode()).hexdigest()


@dataclass(frozen=True)
class MasqueradeRule:
    """One masquerade rule of a family, whatever the backend spells it as."""

    source: str | None  # a pod CIDR; None: any source
    interface: str | None  # as configured ('eth+'); None: any interface but lo
    snat: str | None = None  # the address to SNAT to (egress-masquerade-addresses); None: masquerade
    protocol: str | None = None  # 'tcp' or 'udp' when the rule carries a port range
    ports: tuple[int, int] | None = None
    # With several port ranges: take this rule for `share` / 2^31 of the new connections
    # that reach it (the way xt_statistic and nft's `meta random` count); None: all of them.
    share: int | None = None


# masquerade-to-ports needs a protocol with ports; other protocols get no range.
PORT_PROTOCOLS = ("tcp", "udp")


def masquerade_rules(fp: FamilyPlan) -> list[MasqueradeRule]:
    """Every source x out-interface, the SNAT ones (egress-masquerade-addresses) first, so
    they decide before the masquerade rule of a wider pattern; with port ranges, per
    protocol and range first, the connections spread over the ranges by size, then one
    rule without ports for the rest."""
    variants: list[tuple] = [(None, None, None)]
    if fp.to_ports:
        ranged = []
        remaining = sum(last - first + 1 for first, last in fp.to_ports)
        for i, (first, last) in enumerate(fp.to_ports):
            size = last - first + 1
            share = None if i == len(fp.to_ports) - 1 else round(size / remaining * 2**31)
            ranged.append(((first, last), share))
            remaining -= size
        variants = [(proto, ports, share) for proto in PORT_PROTOCOLS for ports, share in ranged] + variants
    targets = list(fp.snat) + [(interface, None) for interface in (fp.interfaces or (None,))]
    return [
        MasqueradeRule(source, interface, address, proto, ports, share)
        for source in (fp.sources or (None,))
        for interface, address in targets
        for proto, ports, share in variants
    ]


@dataclass(frozen=True)
class Plan:
    families: tuple[FamilyPlan, ...]  # only the enabled families
    # ebpf only: false = no conntrack for the flows its tc programs translate (fast path)
    ebpf_conntrack: bool = True

    def family(self, family: int) -> FamilyPlan | None:
        return next((f for f in self.families if f.family == family), None)

    @property
    def interfaces(self) -> tuple[str, ...]:
        return self.families[0].interfaces if self.families else ()

    def exempt(self) -> tuple[str, ...]:
        return tuple(p for f in self.families for p in f.exempt)

    def to_dict(self) -> dict:
        return {
            "families": {
                f"ipv{f.family}": {
                    "interfaces": list(f.interfaces),
                    "sources": list(f.sources),
                    "exempt": list(f.exempt),
                    "random_fully": f.random_fully,
                    "to_ports": [f"{a}-{b}" for a, b in f.to_ports],
                    **({"snat": dict(f.snat)} if f.snat else {}),
                }
                for f in self.families
            },
            **({} if self.ebpf_conntrack else {"ebpf_conntrack": False}),
        }


def to_record(plan: Plan) -> dict:
    """The plan as JSON holds it, every field (from_record makes it again)."""
    return {"families": [[f.family, list(f.interfaces), list(f.sources), list(f.exempt), f.random_fully,
                          [list(r) for r in f.to_ports], [list(s) for s in f.snat]] for f in plan.families],
            "ebpf_conntrack": plan.ebpf_conntrack}


def from_record(record: dict) -> Plan:
    return Plan(families=tuple(
        FamilyPlan(family=family, interfaces=tuple(interfaces), sources=tuple(sources), exempt=tuple(exempt),
                   random_fully=random_fully, to_ports=tuple(tuple(r) for r in to_ports),  # type: ignore[misc]
                   snat=tuple(tuple(s) for s in snat))  # type: ignore[misc]
        for family, interfaces, sources, exempt, random_fully, to_ports, snat in record["families"]),
        ebpf_conntrack=record["ebpf_conntrack"])


def normalise(items) -> tuple[str, ...]:
    """Merge duplicates, contained and adjacent prefixes; sorted, IPv4 first."""
    items = list(items)
    if set(map(type, items)) - {Prefix}:  # else all parsed already (a Config's lists)
        items = [p if isinstance(p, Prefix) else prefixes.parse(str(p)) for p in items]
    return tuple(prefixes.texts(prefixes.normalise(items)))


def sort_prefixes(items) -> list[str]:
    """In address order, IPv4 first (for people: `list`, `status`). Each family parsed
    and formatted in bulk where it can be (100,000 prefixes: 0.1 s instead of 0.5 s)."""
    items = [str(p) for p in items]
    v4 = [t for t in items if ":" not in t]
    v6 = [t for t in items if ":" in t]
    batch4, batch6 = prefixes.parse_batch(v4, 4), prefixes.parse_batch(v6, 6)
    if batch4 is None or batch6 is None:
        return [str(p) for p in sorted(prefixes.parse(t) for t in items)]
    return [t for batch in (batch4, batch6) for t in prefixes.texts(sorted(batch))]


def _exempt(cfg: Config, family: int) -> list:
    """The exempt entries of the verdict table: [(where from, [Prefix, ...]), ...]."""
    native = cfg.ipv4_native_routing_cidr if family == 4 else cfg.ipv6_native_routing_cidr
    pods = cfg.ipv4_pod_cidr if family == 4 else cfg.ipv6_pod_cidr
    # Cilium's default: without a native-routing CIDR, the node's pod CIDR is exempt.
    v = f"ipv{family}"
    groups = [(f"{v}-native-routing-cidr", list(native))] if native else [(f"{v}-pod-cidr", list(pods))]
    agent = cfg.masq_agent
    if cfg.enable_ip_masq_agent and agent is not None:
        groups.append(("nonMasqueradeCIDRs", [n for n in agent.non_masquerade_cidrs if n.version == family]))
        masq_link_local = agent.masq_link_local if family == 4 else agent.masq_link_local_ipv6
        if not masq_link_local:
            groups.append(("masqLinkLocal" + ("IPv6" if family == 6 else ""),
                           [prefixes.parse(DEFAULTS["link_local"][family])]))
    if cfg.masquerade_only_cidrs:  # masquerade-only: everything is exempt but what is listed
        groups.append(("masquerade-only-cidrs", [verdicts.EVERYTHING[family]]))
    return groups


def _resolved_exempt(cfg: Config, family: int) -> tuple[str, ...]:
    for p in cfg.masquerade_only_cidrs:
        if p.length == 0:
            raise ConfigError(f"key 'masquerade-only-cidrs': {p} masquerades every destination; leave the key out "
                              "for that")
    masquerade = [("force-masquerade-cidrs", list(cfg.force_masquerade_cidrs)),
                  ("masquerade-only-cidrs", list(cfg.masquerade_only_cidrs))]
    return tuple(prefixes.texts(verdicts.resolve(family, _exempt(cfg, family), masquerade)))


def _snat(cfg: Config, family: int) -> tuple[tuple[str, str], ...]:
    """egress-masquerade-addresses of the family, most specific pattern first (an exact
    name, then longer prefixes), each one inside egress-masquerade-interfaces."""
    out = []
    for pattern, address in cfg.egress_masquerade_addresses:
        if (":" in address) != (family == 6):
            continue
        if cfg.egress_masquerade_interfaces:
            if not any(_covers(i, pattern) for i in cfg.egress_masquerade_interfaces):
                raise ConfigError(f"key 'egress-masquerade-addresses': {pattern!r} is not among "
                                  f"egress-masquerade-interfaces ({', '.join(cfg.egress_masquerade_interfaces)}): "
                                  "nothing leaving it is masqueraded")
        elif matches(pattern, "lo"):
            raise ConfigError(f"key 'egress-masquerade-addresses': {pattern!r} matches lo, where nothing is "
                              "masqueraded; name the interfaces")
        out.append((pattern, address))
    return tuple(sorted(out, key=lambda pa: (pa[0].endswith("+"), -len(pa[0]), pa[0])))


def _covers(interfaces: str, pattern: str) -> bool:
    """Every name `pattern` matches is matched by `interfaces` too."""
    if not interfaces.endswith("+"):
        return interfaces == pattern
    return pattern.rstrip("+").startswith(interfaces[:-1]) if pattern.endswith("+") else matches(interfaces, pattern)


def build(cfg: Config) -> Plan:
    families = []
    for family, enabled in ((4, cfg.enable_ipv4_masquerade), (6, cfg.enable_ipv6_masquerade)):
        if not enabled:
            continue
        pods = cfg.ipv4_pod_cidr if family == 4 else cfg.ipv6_pod_cidr
        families.append(
            FamilyPlan(
                family=family,
                interfaces=tuple(cfg.egress_masquerade_interfaces),
                sources=normalise(pods),
                exempt=_resolved_exempt(cfg, family),
                random_fully=cfg.iptables_random_fully,
                to_ports=tuple(cfg.masquerade_to_ports),
                snat=_snat(cfg, family),
            )
        )
    return Plan(families=tuple(families), ebpf_conntrack=cfg.ebpf_conntrack)
