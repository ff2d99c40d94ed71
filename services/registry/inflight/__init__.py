"""Shared first pulls: one upstream download per blob or manifest for the whole cluster."""
