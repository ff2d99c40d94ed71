"""Multi-node tests on network namespaces: one address, containerd and service set per node."""
