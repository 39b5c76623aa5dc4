"""The eBPF datapath's C source (masq.c) and, once `scripts/setup` compiled it, masq.o.

`loader.py` here reads the object (ELF + BTF), creates or reuses the pinned maps, loads
the programs and talks bpf(2) for map reads and writes: no compiler and no libbpf at
run time. The backend that drives it is ipmasq_legacy/backends/ebpf/.
"""
