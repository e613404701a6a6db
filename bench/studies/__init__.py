"""Measurements of one part of Peregrine each (``python -m bench.studies.<name>``): the load
comes from ``bench.loadgen`` and each writes its own section of RESULTS.md through
``bench.results_md``."""
