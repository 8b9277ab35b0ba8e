"""mtlsam_fast benchmarks: pytest-benchmark microbenchmarks, the report CLI (``python -m bench``).

* ``python -m bench [--quick]``: the op sweep (:mod:`bench.report`) with roofline and baselines.
* ``python -m bench e2e``: one optimizer step of F-MTL, SAMO and MGDA on ResNet-18 / a transformer
  (:mod:`bench.e2e`).
* ``pytest bench/test_bench_ops.py``: the microbenchmarks (pytest-benchmark).
"""
