"""Peregrine: a low-latency gRPC inference server speaking the Open Inference Protocol."""

__version__ = "0.1.0"
