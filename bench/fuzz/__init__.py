"""A fuzzer of ModelInferRequest messages sent through a real server.

``targets`` reads what a running server serves (its models' metadata), ``strategies`` builds
hypothesis strategies of requests against those models — valid ones, valid-looking ones with
something wrong, and corrupted bytes — and ``client`` sends one case over raw gRPC and judges
the answer. The bounded CI run (tests/integration/test_fuzz_server.py) and the by-hand run
(``python -m bench.studies.fuzz_server``) share all three.
"""
