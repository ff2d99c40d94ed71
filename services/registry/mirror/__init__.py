"""The registry's mirror path: a local miss fetched from a peer that discovery names (one hop)."""
