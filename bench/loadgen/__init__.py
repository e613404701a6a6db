"""The load tester for Open Inference Protocol (KServe V2) gRPC servers.

``peregrine bench run`` drives one server (closed or open loop, unary or streaming) and
writes a JSON document per run plus a PNG chart; ``peregrine bench compare`` sets runs side
by side. The studies and the comparison drive their load through the same parts:
:class:`bench.loadgen.runner.StepDriver` over a :class:`bench.loadgen.workers.WorkerPool`.
"""
