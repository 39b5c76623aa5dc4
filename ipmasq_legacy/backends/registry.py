"""The backends by name, in the order `auto` breaks ties in and the tests run them.

A leaf module: engines.py (which of them are live) reads it without importing the package,
whose __init__ (get, resolve) imports engines.
"""

from __future__ import annotations

NAMES = ("iptables-legacy", "iptables-nft", "nftables", "ebpf")
