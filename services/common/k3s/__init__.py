"""K3s configuration semantics shared by every service: registries.yaml, the mirroring policy,
and the K3s switches (embedded-registry, disable-default-registry-endpoint)."""
