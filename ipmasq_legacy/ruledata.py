"""The data in rules/: default ranges and each backend's rule shapes.

Kept as YAML beside the code so an operator can read what is installed
without reading Python. Loaded once, read-only.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import yaml


@cache
def load(name: str) -> dict:
    text = (resources.files("ipmasq_legacy") / "rules" / f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


DEFAULTS = load("defaults")
