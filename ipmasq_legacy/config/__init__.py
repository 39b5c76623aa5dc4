"""Configuration (docs/spec.md sections 1 and 2): every shape an operator holds -> one Config.

    values.py     value parsers shared by every shape; ConfigWarning
    text.py       YAML/JSON text, exactly as libyaml reads it (fast for long prefix lists)
    keys.py       Config and the key table in Cilium's agent option names; one layer of keys
    cilium.py     Cilium's values.yaml and cilium-config (manifest, data, mounted directory)
    masqagent.py  the ip-masq-agent file, read as ip-masq-agent reads it
    load.py       load(): which shape a document is, then defaults < file < options

Every error is a ConfigError with one line naming the key, the value and the file.
"""

from __future__ import annotations

import json  # noqa: F401  (tests reach the text readers' modules through this package)
from typing import Any

from ..ruledata import DEFAULTS  # noqa: F401
from . import text
from .cilium import directory_digest  # noqa: F401
from .keys import ALIASES, CLI_ALIASES, KEYS, KNOWN, UNSUPPORTED, Config, apply_layer  # noqa: F401
from .load import SHAPES, default_config_path, load, read_document  # noqa: F401
from .masqagent import MASQ_AGENT_KEYS, MasqAgentConfig, agent_file, from_document, load_masq_agent  # noqa: F401
from .text import FAST_YAML_MIN_ITEMS, _parse_text, _yaml_fast, read_yaml  # noqa: F401
from .values import (  # noqa: F401
    BATCH_MIN_ITEMS,
    DATAPATHS,
    WARNING_KINDS,
    ConfigWarning,
    _as_list,
    _show,
    parse_bool,
    parse_datapath,
    parse_duration,
    parse_go_duration,
    parse_interface,
    parse_interfaces,
    parse_network,
    parse_networks,
    parse_path,
    parse_port_ranges,
)

_read_yaml = read_yaml


def __getattr__(name: str) -> Any:
    """`yaml` and `SAFE_LOADER`, imported when first asked for (text.py says why)."""
    if name in ("yaml", "SAFE_LOADER"):
        return getattr(text, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
