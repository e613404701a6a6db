"""Peer servers for the comparisons: MLServer and KServe, each in a virtualenv of its own."""
