"""fastgan's benchmark harness: fused ops and training steps against eager PyTorch and
``torch.compile``.

* ``cases.py``   what is timed: one ``Case`` per (bench, mode, shape, dtype), with the bytes
                 and FLOPs it must move, and a builder per provider (eager, compile, fastgan);
                 the cases of each family are in ``overhead_cases.py``, ``op_cases.py`` and
                 ``step_cases.py``, what they share in ``common.py``.
* ``timing.py``  how it is timed: ``triton.testing.do_bench`` on CUDA, peak memory, copy
                 bandwidth, the device's name; ``time.perf_counter`` for the CPU smoke run.
* ``runner.py``  the command line (``python -m benchmarks --help``): runs the cases, one row
                 per provider, and writes the results.
* ``report.py``  ``results/<gpu-slug>.json`` (docs/design.md section 7), merged with earlier runs,
                 and the markdown table and PNG plot beside it.
* ``counts.py``  ``--count``: no timing; the kernels, bytes and FLOPs of every case on meta
                 tensors, and the floors they give on an H100 and an H200
                 (``count_report.py``: ``results/counts.md|png``, beside measured results).

``python -m benchmarks --smoke`` runs every case at tiny sizes on the CPU in seconds (CI);
``benchmarks/gpu_check.sh`` runs the GPU tests and every benchmark on one GPU. Run
``python -m benchmarks`` from the repository root, or ``python path/to/benchmarks`` from any
folder.
"""
