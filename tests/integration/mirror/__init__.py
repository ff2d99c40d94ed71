"""Integration tests of the registry mirror path (peers, discovery fake, fault proxies)."""
