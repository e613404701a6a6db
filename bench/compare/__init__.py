"""Peregrine next to the model in-process (the ceiling), a do-nothing V2 servicer (the floor)
and peer servers (MLServer, KServe), under the same load from ``bench.loadgen``."""
