"""Benchmarks: the deformable op against dense ``conv2d`` (:mod:`.ops`), mdpool against
``ROIAlignV2`` (:mod:`.mdpool`), whole detectors built from configs (:mod:`.model`) and the
training cost of R-CNN feature mimicking (:mod:`.mimic`), the logic of ``tools/benchmark_ops.py``,
``tools/benchmark_mdpool.py``, ``tools/benchmark.py`` and ``tools/benchmark_mimic.py``.

They share one synthetic batch, one timing method, one peak-memory method, one fresh process per
case and one table writer (:mod:`.common`). The package imports none of its modules.
"""
