"""Unit tests of the discovery service's pure Kademlia core."""
