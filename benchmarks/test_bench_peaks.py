"""The machine's ceilings as benchmark rows: raw FMA peak, read bandwidth, torch.mm GEMM.

Every other row also carries the run's probe values (conftest.py); these rows add
their spread over rounds. The report takes the best value of the run for each.
"""
import pytest
import torch

from providers import full_run
from shapes import GEMM_SIZE

_C = pytest.importorskip("aladin_fast._C")


def _probe_rounds(benchmark, probe, info_key):
    values = []
    benchmark.group = "peaks"
    benchmark.pedantic(lambda: values.append(probe()), rounds=5, warmup_rounds=0, iterations=1)
    benchmark.extra_info[info_key] = max(values)
    benchmark.extra_info[info_key + "_all"] = values
    assert max(values) > 0


def test_fma_peak(benchmark):
    threads = torch.get_num_threads()
    seconds = 0.3 if full_run(benchmark) else 0.01
    benchmark.extra_info.update(op="probe", shape="fma_peak", provider="probe_fma_peak", dtype="float32",
                                threads=threads, isa=_C.best_isa())
    _probe_rounds(benchmark, lambda: _C.fma_peak("auto", threads, seconds), "measured_gflops")


def test_read_bandwidth(benchmark):
    threads = torch.get_num_threads()
    full = full_run(benchmark)
    size = (512 << 20) if full else (16 << 20)
    benchmark.extra_info.update(op="probe", shape="read_bandwidth", provider="probe_read_bandwidth",
                                dtype="bytes", threads=threads, buffer_bytes=size)
    _probe_rounds(benchmark, lambda: _C.read_bandwidth(size, threads, 0.3 if full else 0.01), "measured_gbs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["sgemm", "bf16_gemm"])
def test_gemm_peak(benchmark, dtype):
    """torch.mm on a large square problem: the machine's practical GEMM rate in this run."""
    generator = torch.Generator().manual_seed(0)
    # torch's bf16 GEMM has no fast path on CPUs without AVX512-BF16/AMX (~1.5 GFLOP/s here): keep it small
    size = (GEMM_SIZE if dtype == torch.float32 else 512) if full_run(benchmark) else 128
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    benchmark.group = "peaks"
    benchmark.extra_info.update(
        op="mm", shape=f"{size}^3", provider=f"torch_mm_{'fp32' if dtype == torch.float32 else 'bf16'}",
        dtype=str(dtype).replace("torch.", ""), flops=2.0 * size**3, threads=torch.get_num_threads(),
    )
    out = benchmark.pedantic(torch.mm, args=(a, b), rounds=7, warmup_rounds=1)
    assert out.shape == (size, size)


def test_read_bandwidth_probe_arguments():
    """Not a benchmark: the probe's contract (positive GB/s, argument errors name the argument)."""
    assert _C.read_bandwidth(1 << 20, 1, 0.001) > 0
    assert _C.read_bandwidth(1 << 20, 0, 0.001) > 0  # 0 threads = the OpenMP default
    with pytest.raises(ValueError, match="bytes"):
        _C.read_bandwidth(100, 1, 0.01)
    with pytest.raises(ValueError, match="num_threads"):
        _C.read_bandwidth(1 << 20, -1, 0.01)
