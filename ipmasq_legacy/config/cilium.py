"""Cilium's documents: the Helm values.yaml and the cilium-config ConfigMap.

cilium-config comes as a manifest (`kubectl get cm cilium-config -o yaml`), as its `data`
alone, or mounted as a directory (one file per key, the kubelet's `..data` symlink swapped
on each update). Both documents are turned into entries in Cilium's agent option names
(config/keys.py reads them) the way Cilium's chart and agent read them; keys that have
nothing to do with masquerading are returned to be listed in one warning.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..inputs import Missing, read_bytes, show
from ..ruledata import DEFAULTS
from .keys import ALIASES, KEYS, UNSUPPORTED

# values.yaml path -> the cilium-config key the chart writes it to
# (install/kubernetes/cilium/templates/cilium-configmap.yaml)
HELM_KEYS = {
    "enableIPv4Masquerade": "enable-ipv4-masquerade",
    "enableIPv6Masquerade": "enable-ipv6-masquerade",
    "bpf.masquerade": "enable-bpf-masquerade",
    "ipMasqAgent.enabled": "enable-ip-masq-agent",
    "egressMasqueradeInterfaces": "egress-masquerade-interfaces",
    "ipv4NativeRoutingCIDR": "ipv4-native-routing-cidr",
    "ipv6NativeRoutingCIDR": "ipv6-native-routing-cidr",
    "nativeRoutingCIDR": "native-routing-cidr",
    "iptablesRandomFully": "iptables-random-fully",
    "enableMasqueradeRouteSource": "enable-masquerade-to-route-source",
    "egressGateway.enabled": "enable-ipv4-egress-gateway",
    "ipv4.enabled": "enable-ipv4",
    "ipv6.enabled": "enable-ipv6",
    "devices": "devices",
}
HELM_INLINE_AGENT = "ipMasqAgent.config"  # inline ip-masq-agent settings (the chart's ip-masq-agent ConfigMap)
HELM_EXTRA = "extraConfig"  # raw cilium-config keys, written after the chart's own
HELM_READ = set(HELM_KEYS) | {HELM_INLINE_AGENT, "eni.enabled"}
HELM_PARENTS = {path.split(".")[0] for path in HELM_READ if "." in path}
# A document with one of these top-level keys is a values.yaml: the masquerading ones, and
# ones every values.yaml for the chart is likely to set.
HELM_MARKERS = ({path.split(".")[0] for path in HELM_READ} | {HELM_EXTRA} | {
    "kubeProxyReplacement", "k8sServiceHost", "k8sServicePort", "routingMode", "tunnelProtocol", "ipam",
    "hubble", "operator", "image", "cluster", "autoDirectNodeRoutes", "cni", "l7Proxy", "loadBalancer",
}) - {"devices"}
# Keys the chart writes into every cilium-config: a document with one of them is cilium-config's data.
CONFIGMAP_MARKERS = {"identity-allocation-mode", "cluster-name", "cluster-id", "monitor-aggregation",
                     "preallocate-bpf-maps", "routing-mode", "tunnel", "tunnel-protocol", "kube-proxy-replacement",
                     "ipam"}
READ = set(KEYS) | set(ALIASES) | set(UNSUPPORTED)  # the cilium-config keys that are read


def is_helm(doc: dict) -> bool:
    return any(key in HELM_MARKERS for key in doc)


def is_configmap_data(doc: dict) -> bool:
    return any(key in CONFIGMAP_MARKERS for key in doc)


def is_manifest(doc: dict) -> bool:
    return doc.get("kind") == "ConfigMap" and "apiVersion" in doc and "data" in doc


def configmap_entries(data: dict, prefix: str = "") -> tuple[list, list]:
    """cilium-config's data -> (entries, keys ignored). An empty value is an unset key."""
    entries, ignored = [], []
    for key, value in data.items():
        if key not in READ:
            ignored.append(f"{prefix}{key}")
        elif value is not None and not (isinstance(value, str) and not value.strip()):
            entries.append((key, value.strip() if isinstance(value, str) else value, f"{prefix}{key}"))
    return entries, ignored


def _flatten(doc: dict, label: str) -> dict[str, Any]:
    """The values.yaml paths this tool reads, plus the top-level keys and the children of
    the parents it reads from, as dotted paths."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        key = str(key)
        if key in HELM_PARENTS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"key {key!r} in {label}: expected a mapping (as in Cilium's values.yaml), "
                                  f"got {show(value)}")
            for child, child_value in value.items():
                flat[f"{key}.{child}"] = child_value
        else:
            flat[key] = value
    return flat


def helm_layers(doc: dict, label: str) -> tuple[list, list, dict | None]:
    """values.yaml -> (layers of entries, keys ignored, inline ip-masq-agent settings or None).

    Read over the chart's defaults where they differ from the agent's (rules/defaults.yaml:
    the chart leaves IPv6 off; in ENI mode IPv4 masquerading too)."""
    ours = [k for k in doc if k in READ and k != "devices"]
    if ours:
        raise ConfigError(f"{label}: mixes Helm values ({', '.join(sorted(k for k in doc if k in HELM_MARKERS))}) "
                          f"with agent keys ({', '.join(ours)}): write one or the other")
    flat = _flatten(doc, label)
    defaults = dict(DEFAULTS["cilium_helm_defaults"])
    if flat.get("eni.enabled") is True:
        defaults["enableIPv4Masquerade"] = False
    entries, ignored = [], []
    for path, value in {**{p: d for p, d in defaults.items() if flat.get(p) is None}, **flat}.items():
        if path in HELM_KEYS:
            if value is not None and value != "":  # null is the chart's "not set"
                entries.append((HELM_KEYS[path], value, path))
        elif path not in (HELM_INLINE_AGENT, HELM_EXTRA, "eni.enabled"):
            ignored.append(path)
    layers = [entries]
    extra = flat.get(HELM_EXTRA)
    if extra is not None:
        if not isinstance(extra, dict):
            raise ConfigError(f"key {HELM_EXTRA!r} in {label}: expected a mapping of cilium-config keys, got {show(extra)}")
        extra_entries, extra_ignored = configmap_entries(extra, f"{HELM_EXTRA}.")
        layers.append(extra_entries)
        ignored += extra_ignored
    inline = flat.get(HELM_INLINE_AGENT)
    if inline is not None and not isinstance(inline, dict):
        raise ConfigError(f"key {HELM_INLINE_AGENT!r} in {label}: expected a mapping of ip-masq-agent keys, "
                          f"got {show(inline)}")
    return layers, ignored, (inline or None)


# ---------------------------------------------------------------- a ConfigMap mounted as a directory


def _version_dir(path: Path) -> Path:
    """Where the kubelet keeps the files of the current version: `..data` resolved once,
    so every key is read from one version even while the next is swapped in."""
    link = path / "..data"
    return Path(os.path.realpath(link)) if link.is_dir() else path


MAX_KEYS = 10_000  # files in a ConfigMap directory (Kubernetes caps a ConfigMap at 1 MiB)


def read_directory(path: Path, label: str) -> dict[str, bytes]:
    """{key: bytes} of a ConfigMap directory; dot-names (the kubelet's `..data`,
    `..2024_...`, editors' files) and subdirectories are not keys."""
    for _attempt in range(3):  # the version read may be removed by the kubelet under us
        base = _version_dir(path)
        try:
            data: dict[str, bytes] = {}
            for name in sorted(os.listdir(base)):
                entry = base / name
                if name.startswith(".") or entry.is_dir():
                    continue
                if len(data) >= MAX_KEYS:
                    raise ConfigError(f"{label}: more than {MAX_KEYS} files: not a ConfigMap")
                data[name] = read_bytes(entry, f"{label}: key file")  # regular files only, bounded
            return data
        except (FileNotFoundError, Missing):
            continue
        except OSError as exc:
            raise ConfigError(f"{label}: cannot read: {exc.strerror or exc}") from None
    raise ConfigError(f"{label}: its files kept vanishing while read (a ConfigMap update?): try again")


def directory_text(data: dict[str, bytes], label: str) -> dict[str, str]:
    try:
        return {name: raw.decode("utf-8") for name, raw in data.items()}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: a key's file is not UTF-8 text: {exc}") from None


def directory_digest(path: Path) -> str:
    """What a directory config holds, as one digest (reconcile's unchanged-inputs check)."""
    digest = hashlib.sha256()
    for name, raw in read_directory(path, f"config directory {path}").items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(raw).digest())
    return digest.hexdigest()
