"""Benchmarks of ipmasq-legacy: apply/reconcile cost, new-connection cost, throughput.

Run ``python -m bench`` (as root) from the repository root; see bench/README.md.
"""
