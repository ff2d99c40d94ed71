"""Unit tests of the pinner service."""
