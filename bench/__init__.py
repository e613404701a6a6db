"""Peregrine's load tester and comparisons for Open Inference Protocol (KServe V2) gRPC servers.

``peregrine bench run`` drives one server (closed or open loop, unary or streaming) and
writes a JSON document per run plus PNG plots; ``peregrine bench compare`` sets runs side by
side; ``python -m bench.compare_all`` runs the whole comparison of bench/README.md.
"""

#: Version tag of the run document's layout (bench/schema.py checks it).
SCHEMA = "peregrine-bench/1"
