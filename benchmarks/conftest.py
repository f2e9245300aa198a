import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


@pytest.fixture(autouse=True)
def _machine_peaks(request):
    """Every benchmark row carries the machine's ceilings measured in this run (benchmarks/peaks.py):
    raw FMA peak, read bandwidth and sgemm rate, so the report can place it on the roofline."""
    if "benchmark" in request.fixturenames:
        from peaks import measure_peaks
        from providers import full_run

        benchmark = request.getfixturevalue("benchmark")
        benchmark.extra_info.update(measure_peaks(quick=not full_run(benchmark)))
    yield
