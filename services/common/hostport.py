"""`host:port` as URLs and gRPC targets spell it: an IPv6 address goes in brackets."""

from __future__ import annotations


def join_host_port(host: str, port: int) -> str:
    """`host:port`, or `[host]:port` for an IPv6 address (the only hosts with a colon)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
