"""The data in rules/: default ranges and each backend's rule shapes.

Kept as YAML beside the code so an operator can read what is installed
without reading Python. Loaded once, read-only.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import yaml

# libyaml's loader where PyYAML was built with it: every CLI run reads these files (a few
# ms less than the pure-Python loader)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def load(name: str) -> dict:
    text = (resources.files("ipmasq_legacy") / "rules" / f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.load(text, Loader=_LOADER)


DEFAULTS = load("defaults")
