"""Simulated networks for testing and benchmarking the pure cores without sockets."""
