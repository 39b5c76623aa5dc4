"""load(): one Config from whichever shape the operator holds.

The shape is told from the document itself: a directory is a ConfigMap mounted whole
(cilium-config, or this tool's own when it holds `config.yaml`); a ConfigMap manifest is
read by its `data`; a values.yaml is known by Cilium's chart keys (enableIPv4Masquerade,
bpf, ipMasqAgent, ...), cilium-config's data by keys the chart always writes
(identity-allocation-mode, cluster-name, ...). Anything else is this tool's own file, in
Cilium's agent option names, where an unknown key is an error (docs/spec.md section 1); in
Cilium's two documents keys unrelated to masquerading are listed in one warning instead.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..inputs import cut, path_kind
from ..ruledata import DEFAULTS
from . import cilium, text
from .keys import CLI_ALIASES, Config, apply_layer
from .masqagent import from_document, load_masq_agent
from .values import ConfigWarning, parse_bool

SHAPES = {"ipmasq-legacy": "this tool's file", "helm-values": "Cilium Helm values",
          "cilium-config": "cilium-config ConfigMap", "defaults": "all defaults"}


@dataclass
class Document:
    shape: str  # a key of SHAPES
    label: str  # "config file /x", "Helm values /x", "cilium-config /x": starts a warning
    origin: str  # "in /x": follows a key's name in an error
    layers: list  # lists of entries (keys.Entry), applied in order
    strict: bool  # an unknown key is an error (this tool's file) or listed in one warning
    ignored: list = field(default_factory=list)
    inline_agent: dict | None = None  # Helm's ipMasqAgent.config


def default_config_path() -> str:
    return os.environ.get("IPMASQ_CONFIG") or DEFAULTS["config_path"]


def _ours(doc: dict, path: Path, label: str | None = None) -> Document:
    return Document("ipmasq-legacy", label or f"config file {path}", f"in {path}",
                    [[(key, value, key) for key, value in doc.items()]], strict=True)


def _configmap(data: dict, path: Path, label: str) -> Document:
    entries, ignored = cilium.configmap_entries(data)
    return Document("cilium-config", label, f"in {label}", [entries], strict=False, ignored=ignored)


def classify(doc: Any, path: Path) -> Document:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(doc).__name__}")
    if cilium.is_manifest(doc):
        data = doc.get("data") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: the ConfigMap's data is not a mapping")
        if "config.yaml" in data:  # this tool's own ConfigMap
            return classify(text._parse_text(str(data["config.yaml"]), f"config file {path} (key config.yaml)"),
                            path)
        if set(data) == {"config"}:
            raise ConfigError(f"config file {path}: this is an ip-masq-agent ConfigMap (only key 'config'): "
                              "set enable-ip-masq-agent: true and ip-masq-agent-config-path to where it is mounted")
        return _configmap(data, path, f"cilium-config {path}")
    if cilium.is_helm(doc):
        label = f"Helm values {path}"
        layers, ignored, inline = cilium.helm_layers(doc, label)
        return Document("helm-values", label, f"in {label}", layers, strict=False, ignored=ignored,
                        inline_agent=inline)
    if cilium.is_configmap_data(doc):
        return _configmap(doc, path, f"cilium-config {path}")
    return _ours(doc, path)


def read_document(path: Path, must_exist: bool) -> Document | None:
    kind = path_kind(path, "config file")  # a symlink loop is an error, never "missing"
    if kind == "dir":
        label = f"cilium-config {path}"
        data = cilium.directory_text(cilium.read_directory(path, label), label)
        if "config.yaml" in data:  # this tool's own ConfigMap, mounted without items:
            document = classify(text._parse_text(data.pop("config.yaml"), f"config file {path}/config.yaml"),
                                path / "config.yaml")
            document.ignored += sorted(data)
            return document
        document = _configmap(data, path, label)
        if not data:
            document.ignored.append("(none: the directory holds no keys; a ConfigMap not mounted yet?)")
        return document
    if kind == "missing":
        if must_exist:
            raise ConfigError(f"config file {path}: no such file")
        return None
    return classify(text.read_yaml(path, "config file"), path)


def load(path: str | None = None, options: dict[str, Any] | None = None, missing_ok: bool | None = None) -> Config:
    """Defaults < file < options. `path` None means IPMASQ_CONFIG or the default path. A
    missing file means all defaults only when `missing_ok` (by default: for the default
    path alone); a path named explicitly must exist."""
    explicit = path is not None or bool(os.environ.get("IPMASQ_CONFIG"))
    file_path = Path(path if path is not None else default_config_path())
    if missing_ok is None:
        missing_ok = not explicit
    document = read_document(file_path, must_exist=not missing_ok)

    values: dict[str, Any] = {}
    notes: list[ConfigWarning] = []
    if document is not None:
        ignored = list(document.ignored)
        for layer in document.layers:
            ignored += apply_layer(values, layer, document.origin, document.strict, notes)
        if ignored:
            notes.insert(0, ConfigWarning("ignored-keys", f"{document.label}: {len(ignored)} key"
                                          f"{'s' if len(ignored) > 1 else ''} unrelated to masquerading ignored: "
                                          f"{', '.join(cut(str(k), 80) for k in ignored[:200])}"
                                          + (f" (+{len(ignored) - 200} more)" if len(ignored) > 200 else "")))
    file_datapath = values.get("datapath")
    options = options or {}
    apply_layer(values, [(key, value, key) for key, value in options.items()], "on the command line", True, notes)
    # An option beats the file, whatever it is spelled as: --bpf-masquerade false says
    # "not ebpf" but names no backend, so over a file that says ebpf it is an error.
    off = [key for key in CLI_ALIASES if key in options and not parse_bool(options[key], key)]
    if off and "datapath" not in options and file_datapath == "ebpf":
        raise ConfigError(f"key {off[0]!r} on the command line: false, but the config file {cut(str(file_path))} "
                          "says datapath ebpf: give --backend NAME")

    shape = document.shape if document is not None else "defaults"
    inline = document.inline_agent if document is not None else None
    cfg = Config(**values, source=str(file_path) if document is not None else "<defaults>", shape=shape,
                 ip_masq_agent_inline=inline is not None)
    if cfg.enable_ip_masq_agent:
        # who else reads this file on such a node: their differences are warned about
        reader = "cilium" if shape in ("helm-values", "cilium-config") else "ip-masq-agent"
        label = document.label if document is not None else str(file_path)  # inline and cilium: from a document
        if inline is not None:
            where = f"{cilium.HELM_INLINE_AGENT} in {label}"
            agent = from_document(inline, where, f"{file_path} {cilium.HELM_INLINE_AGENT}", reader=reader)
        else:
            agent = load_masq_agent(cfg.ip_masq_agent_config_path, reader=reader)
        notes += agent.warnings
        if reader == "cilium" and cfg.datapath != "ebpf":
            notes.append(ConfigWarning("cilium-difference", f"{label}: enable-ip-masq-agent without BPF "
                                       "masquerading, which Cilium refuses: here the ip-masq-agent ranges apply in "
                                       f"the {cfg.datapath} datapath"))
        cfg = dataclasses.replace(cfg, masq_agent=agent)
    return dataclasses.replace(cfg, warnings=tuple(notes))
