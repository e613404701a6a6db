"""Tensor codecs for the Open Inference Protocol wire formats."""
