"""Peregrine's benchmarks, run from a source checkout (the wheel does not install them).

- ``bench.loadgen``: the load tester, ``peregrine bench run | compare | all``;
- ``bench.compare``: Peregrine next to the model's in-process ceiling, a do-nothing servicer
  (the floor) and peer servers, ``python -m bench.compare``;
- ``bench.studies``: measurements of one part of Peregrine, each driving load through
  ``bench.loadgen`` and writing its own section of RESULTS.md;
- ``bench.micro``: micro-benchmarks of the compiled kernels against their numpy oracles;
- ``bench.results_md``: the one writer of RESULTS.md's sections.
"""
