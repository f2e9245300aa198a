"""CPU rerank: the fused C++ kernel vs torch eager formulations and the machine's sgemm.

Run for real with ``make bench`` (writes benchmarks/results/<machine>.json and a
plot); the default test run executes each case once with --benchmark-disable.
Each row carries FLOPs in ``extra_info`` so benchmarks/report.py can turn
times into GFLOP/s, % of the same run's sgemm, and speed-up ratios.
"""
import pytest
import torch

import aladin_fast
from shapes import GEMM_SIZE, RERANK_SHAPES

PROVIDERS = ["aladin_fast_cpu_fp32", "aladin_fast_cpu_bf16", "torch_einsum_fp32", "torch_matmul_reshape_fp32"]


def _rerank_inputs(words, regions, dim, candidates, gallery, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(1, words, dim, generator=generator), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(gallery, regions, dim, generator=generator), dim=-1)
    ids = torch.randperm(gallery, generator=generator)[:candidates][None]
    return query, images, ids


def _torch_einsum(query, images, ids):
    sim = torch.einsum("wd,krd->kwr", query[0], images[ids[0]])
    return sim.amax(dim=-1).sum(dim=-1)[None]


def _torch_matmul_reshape(query, images, ids):
    gathered = images[ids[0]]
    k, r, d = gathered.shape
    sim = (query[0] @ gathered.reshape(k * r, d).T).view(-1, k, r)
    return sim.amax(dim=-1).sum(dim=0)[None]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(RERANK_SHAPES))
def test_rerank(benchmark, shape_name, provider):
    shape = RERANK_SHAPES[shape_name]
    query, images, ids = _rerank_inputs(**shape)
    expected = _torch_matmul_reshape(query, images, ids)
    if provider.startswith("aladin_fast"):
        if provider.endswith("bf16"):
            query, images = query.bfloat16(), images.bfloat16()
        fn = lambda: aladin_fast.rerank_scores(query, images, ids, backend="cpu")  # noqa: E731
    elif provider == "torch_einsum_fp32":
        fn = lambda: _torch_einsum(query, images, ids)  # noqa: E731
    else:
        fn = lambda: _torch_matmul_reshape(query, images, ids)  # noqa: E731
    element_bytes = query.element_size()
    benchmark.group = shape_name
    benchmark.extra_info.update(
        op="rerank_scores", shape=shape_name, provider=provider, dtype=str(query.dtype).replace("torch.", ""),
        flops=2.0 * shape["words"] * shape["regions"] * shape["dim"] * shape["candidates"],
        bytes=float(shape["candidates"] * shape["regions"] * shape["dim"] * element_bytes),
        threads=torch.get_num_threads(),
    )
    result = benchmark.pedantic(fn, rounds=9, warmup_rounds=1, iterations=1)  # runs once when disabled
    tolerance = 5e-2 if provider.endswith("bf16") else 1e-3
    torch.testing.assert_close(result, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["sgemm", "bf16_gemm"])
def test_gemm_peak(benchmark, dtype):
    """torch.mm on a large square problem: the machine's practical GEMM rate in this run."""
    generator = torch.Generator().manual_seed(0)
    # torch's bf16 GEMM has no fast path on CPUs without AVX512-BF16/AMX (~0.2 GFLOP/s here): keep it small
    size = GEMM_SIZE if dtype == torch.float32 else 512
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    benchmark.group = "gemm"
    benchmark.extra_info.update(
        op="mm", shape=f"{size}^3", provider=f"torch_mm_{'fp32' if dtype == torch.float32 else 'bf16'}",
        dtype=str(dtype).replace("torch.", ""), flops=2.0 * size**3, threads=torch.get_num_threads(),
    )
    out = benchmark.pedantic(torch.mm, args=(a, b), rounds=7, warmup_rounds=1)
    assert out.shape == (size, size)
