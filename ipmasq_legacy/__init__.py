"""ipmasq-legacy: masquerade (source NAT) manager for pod and container egress."""

__version__ = "0.1.0"
