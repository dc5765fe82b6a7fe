"""The eBPF program of the attribution tier (attribution.bpf.c, package data; see kernel/bpf.py)."""
