"""Unit tests of metrics helpers, request ids and the status report."""
