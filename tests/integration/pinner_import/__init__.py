"""Air-gap import, pinning and the Pinner API against a real containerd."""
