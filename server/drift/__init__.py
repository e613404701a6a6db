"""Drift monitoring: a sampler on the hot path, an analyser thread off it, reference profiles,
a sample store and reports. See docs/operations.md, "Drift monitoring".

Nothing is imported here, so that ``peregrine serve`` without drift pays nothing for it.
"""
