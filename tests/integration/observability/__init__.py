"""Integration tests of metrics, request-id logs and `peermirror status`."""
