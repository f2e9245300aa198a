"""The benchmarks' bookkeeping: FLOP / byte counts, rates and units, quartiles, ratios, peaks and report rows.

Every expected value is computed here by hand or by an independent float64 / exact-integer formula; nothing
is timed for real (clocks, CUDA events and ``do_bench`` are faked where a helper reads them), no GPU is needed.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import sys
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "benchmarks", "gpu")):
    if folder not in sys.path:
        sys.path.insert(0, folder)

import peaks  # noqa: E402
import report  # noqa: E402
import shapes  # noqa: E402
from shapes import Shape  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ shapes: FLOPs, bytes, intensity
def test_shape_flops_are_two_w_r_d_per_pair_for_every_benchmark_shape():
    for shape in shapes.ALL_SHAPES.values():
        k = shape.gallery if shape.candidates is None else shape.candidates
        assert shape.k == k and shape.pairs == shape.queries * k
        # exact integers: one multiply and one add per word-region-feature triple of every pair
        assert shape.flops == 2 * shape.queries * k * shape.words * shape.regions * shape.dim


def test_shape_flops_quoted_in_the_notes():
    gallery = shapes.GALLERY_SHAPES
    assert gallery["gallery_T25000_I5000_W20_R36_D1024"].flops == pytest.approx(184.32e12)  # "184 TFLOP"
    assert gallery["gallery_T100_I1000_W20_R36_D1024"].flops == pytest.approx(147.456e9)  # "147 GFLOP"
    assert shapes.RERANK_SHAPES["rerank_Q64_K1000_W32_R36_D1024"].flops == pytest.approx(150.99e9, rel=1e-4)
    # the training forward of README's GPU table: 38.65 GFLOP, 0.167 ms -> 231 TFLOP/s
    train = shapes.ALL_PAIRS_SHAPES["allpairs_B128_W32_R36_D1024"]
    assert train.flops == 38_654_705_664
    assert train.flops / 0.167e-3 / 1e12 == pytest.approx(231.5, abs=0.1)


def test_min_bytes_reads_each_query_and_each_touched_image_once():
    shape = Shape("t", "rerank", queries=3, words=5, regions=7, dim=16, gallery=50, candidates=10)
    for element_size in (4, 2):
        expected = (3 * 5 + 20 * 7) * 16 * element_size
        assert shape.min_bytes(element_size, images_read=20) == expected
        assert shape.intensity(element_size, images_read=20) == pytest.approx(
            float(Fraction(2 * 3 * 10 * 5 * 7 * 16, expected)))
    # bf16 storage halves the bytes and doubles the intensity
    assert shape.intensity(2, 20) == pytest.approx(2 * shape.intensity(4, 20))
    all_pairs = Shape("a", "all_pairs", 4, 5, 7, 16, 9)
    assert all_pairs.expected_images_read() == 9.0
    assert all_pairs.min_bytes(4) == (4 * 5 + 9 * 7) * 16 * 4


def test_rerank_intensity_is_about_w_over_two_flop_per_fp32_byte():
    # the shapes' notes: "~W/2 FLOP/byte in fp32", "10 FLOP/byte in fp32, 20 in bf16", "2 FLOP/byte"
    one_k = shapes.RERANK_SHAPES["rerank_Q1_K1000_W32_R36_D1024"]
    w20 = shapes.RERANK_SHAPES["rerank_Q1_K5000_W20_R36_D768"]
    w4 = shapes.RERANK_SHAPES["rerank_Q1_K5000_W4_R36_D768"]
    assert one_k.intensity(4, images_read=1000) == pytest.approx(16.0, rel=1e-3)
    assert w20.intensity(4, images_read=5000) == pytest.approx(10.0, rel=1e-3)
    assert w20.intensity(2, images_read=5000) == pytest.approx(20.0, rel=1e-3)
    assert w4.intensity(4, images_read=5000) == pytest.approx(2.0, rel=1e-3)


def test_expected_images_read_matches_exhaustive_enumeration():
    """K distinct random ids per caption: the expected number of distinct images, against every outcome."""
    gallery, k, queries = 6, 2, 3
    subsets = list(itertools.combinations(range(gallery), k))
    total = Fraction(0)
    for choice in itertools.product(subsets, repeat=queries):
        total += len(set().union(*choice))
    exact = total / len(subsets) ** queries
    shape = Shape("t", "rerank", queries, 4, 3, 8, gallery, k)
    assert shape.expected_images_read() == pytest.approx(float(exact), rel=1e-12)
    # the stored CPU run: 64 queries x 100 of 5,000 touched 3,628 distinct images
    q64 = shapes.RERANK_SHAPES["rerank_Q64_K100_W32_R36_D1024"]
    assert q64.expected_images_read() == pytest.approx(3628, abs=30)


def test_smoke_shapes_keep_w_r_d():
    for shape in shapes.ALL_SHAPES.values():
        small = shape.smoke()
        assert (small.words, small.regions, small.dim) == (shape.words, shape.regions, shape.dim)
        assert small.k <= small.gallery and small.pairs <= shape.pairs


# ------------------------------------------------------------------ the forward benchmark case's extra_info
class FakeBenchmark:
    """What run_forward_case / the training test use of pytest-benchmark's fixture; runs ``fn`` once."""

    def __init__(self, disabled: bool):
        self.disabled = disabled
        self.extra_info: dict = {}
        self.group = None
        self.pedantic_calls: list = []

    def pedantic(self, fn, args=(), kwargs=None, rounds=1, warmup_rounds=0, iterations=1):
        self.pedantic_calls.append(dict(rounds=rounds, warmup_rounds=warmup_rounds, iterations=iterations))
        return fn(*args, **(kwargs or {}))


@pytest.fixture
def no_bench_env(monkeypatch):
    import providers

    monkeypatch.delenv(providers.FULL_ENV, raising=False)
    monkeypatch.delenv(providers.SMOKE_ENV, raising=False)
    return providers


@pytest.mark.parametrize("provider, element_size", [("torch_einsum_fp32", 4), ("aladin_fast_cpu_bf16", 2)])
def test_forward_case_records_flops_and_bytes_of_the_timed_problem(no_bench_env, provider, element_size):
    pytest.importorskip("aladin_fast._C")
    providers = no_bench_env
    shape = Shape("math_rerank_Q2_K4_W5_R3_D8", "rerank", 2, 5, 3, 8, 10, 4)
    benchmark = FakeBenchmark(disabled=False)  # a timed run: the shape itself, not its smoke version
    providers.run_forward_case(benchmark, shape, provider, op="rerank_scores")
    _, _, candidates = providers.make_problem(shape)
    distinct = len(set(candidates.flatten().tolist()))
    info = benchmark.extra_info
    assert info["flops"] == 2 * 2 * 4 * 5 * 3 * 8
    assert info["images_read"] == distinct
    assert info["bytes"] == (2 * 5 + distinct * 3) * 8 * element_size
    assert info["dtype"] == ("float32" if element_size == 4 else "bfloat16")
    assert (info["queries"], info["words"], info["regions"], info["dim"]) == (2, 5, 3, 8)
    # warm-up excluded: the first call happened before pedantic, which times iterations=1 per round
    (call,) = benchmark.pedantic_calls
    assert call["iterations"] == 1
    if provider.startswith("aladin_fast"):
        assert call["rounds"] >= providers.OURS_MIN_ROUNDS


def test_training_case_counts_forward_plus_argmax_backward_flops(no_bench_env):
    training = pytest.importorskip("test_bench_training")
    shape = shapes.TRAINING_SHAPES["train_B128_W32_R36_D768"]
    benchmark = FakeBenchmark(disabled=True)  # smoke: the batch shrinks to SMOKE_BATCH, the counts follow it
    training.test_training_step(benchmark, shape.name, "aladin_fast_cpu_fp32")
    b, w, r, d = shapes.SMOKE_BATCH, 32, 36, 768
    info = benchmark.extra_info
    assert info["queries"] == info["gallery"] == b
    assert info["flops"] == 2 * b * b * w * r * d + 4 * b * b * w * d  # forward similarities + gather / scatter
    assert info["bytes"] == (b * w + b * r) * d * 4 * 2  # read T and V once, write their gradients once


def test_rounds_for_and_images_read():
    import providers

    assert providers.rounds_for(1e-6) == 9
    assert providers.rounds_for(10.0) == 3
    assert providers.rounds_for(0.5, minimum=7) == 7
    assert providers.rounds_for(0.4) == 7  # 3 s budget // 0.4 s
    images = torch.zeros(10, 3, 4)
    assert providers.images_read(images, None) == 10
    assert providers.images_read(images, torch.tensor([[1, 2, 3], [3, 4, 1]])) == 4


# ------------------------------------------------------------------ the CPU peaks
def test_sgemm_gflops_is_two_n_cubed_over_the_best_trial(monkeypatch):
    clock = iter([0.0, 0.5, 10.0, 10.25, 20.0, 21.0])  # trials of 0.5, 0.25 and 1.0 s
    monkeypatch.setattr(peaks.time, "perf_counter", lambda: next(clock))
    assert peaks.sgemm_gflops(64, trials=3) == pytest.approx(2 * 64**3 / 0.25 / 1e9)


# ------------------------------------------------------------------ CPU report rows
def _bench(provider, shape, data, op="rerank_scores", dtype="float32", flops=2e9, nbytes=1e8, **extra):
    """A pytest-benchmark entry with its per-round ``data`` and the stats pytest-benchmark derives."""
    ordered = sorted(data)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    info = dict(op=op, shape=shape, provider=provider, dtype=dtype, flops=flops, bytes=nbytes, threads=2, **extra)
    stats = dict(median=statistics.median(data), iqr=q3 - q1, min=min(data), rounds=len(data), data=list(data))
    return {"extra_info": info, "stats": stats}


def _raw():
    probe = dict(fma_peak_gflops=90.0, read_bandwidth_gbs=20.0, sgemm_gflops=50.0)
    return {"datetime": "2026-01-01T00:00:00", "machine_info": {"python_version": "3.11"}, "benchmarks": [
        {"extra_info": dict(op="probe", shape="fma_peak", provider="probe_fma_peak", dtype="float32",
                            measured_gflops=100.0, **probe), "stats": dict(median=0.3, iqr=0, min=0.3, rounds=5)},
        {"extra_info": dict(op="probe", shape="read_bandwidth", provider="probe_read_bandwidth", dtype="bytes",
                            measured_gbs=25.0, **probe), "stats": dict(median=0.5, iqr=0, min=0.5, rounds=5)},
        # sgemm: best 2 * 1024^3 / 0.02 s = 107.4 GFLOP/s, median 0.025 s
        _bench("torch_mm_fp32", "1024^3", [0.025, 0.02, 0.03], op="mm", flops=2.0 * 1024**3, nbytes=None, **probe),
        _bench("torch_mm_bf16", "512^3", [0.2, 0.2, 0.2], op="mm", dtype="bfloat16", flops=2.0 * 512**3,
               nbytes=None, **probe),
        # rerank: 2 GFLOP, 100 MB (20 FLOP/byte): ours 0.05 s, the two baselines 0.2 s and 0.1 s
        _bench("aladin_fast_cpu_fp32", "rr", [0.06, 0.05, 0.04, 0.05, 0.07], **probe),
        _bench("aladin_fast_cpu_bf16", "rr", [0.08, 0.08, 0.08], dtype="bfloat16", nbytes=5e7, **probe),
        _bench("torch_einsum_fp32", "rr", [0.2, 0.2, 0.2], **probe),
        _bench("torch_compile_fp32", "rr", [0.1, 0.1, 0.1], **probe),
        # the same shape name under another op must not enter the rerank ratios
        _bench("torch_einsum_fp32", "rr", [1.0, 1.0, 1.0], op="alignment_scores", **probe),
        # bandwidth-bound: 0.2 GFLOP over 1e8 bytes (2 FLOP/byte)
        _bench("aladin_fast_cpu_fp32", "bw", [0.01, 0.01, 0.01], flops=2e8, **probe),
    ]}


def _row(rows, provider, shape, op="rerank_scores"):
    return next(r for r in rows if r["provider"] == provider and r["shape"] == shape and r.get("op") == op)


def test_run_peaks_are_the_best_probe_values_of_the_run():
    rows = report.build_rows(_raw())
    assert report.run_peaks(rows) == {"fma_peak_gflops": 100.0, "read_bandwidth_gbs": 25.0,
                                      "sgemm_gflops": pytest.approx(2 * 1024**3 / 0.02 / 1e9)}
    # non-positive / missing probe values never become a peak
    assert report.run_peaks([{"fma_peak_gflops": -1.0}, {"fma_peak_gflops": None}])["fma_peak_gflops"] is None


def test_row_rates_fractions_and_roofline_by_hand():
    rows = report.build_rows(_raw())
    ours = _row(rows, "aladin_fast_cpu_fp32", "rr")
    assert ours["median_s"] == 0.05 and ours["min_s"] == 0.04 and ours["rounds"] == 5
    assert ours["iqr_s"] == pytest.approx(0.06 - 0.05)  # q3 - q1 of 0.04 0.05 0.05 0.06 0.07
    assert ours["gflops"] == pytest.approx(2e9 / 0.05 / 1e9)  # 40 GFLOP/s, from the median (1e9, not 2**30)
    assert ours["gflops_best"] == pytest.approx(50.0)
    assert ours["fraction_of_fma_peak"] == pytest.approx(0.4)
    assert ours["gbytes_per_s"] == pytest.approx(1e8 / 0.05 / 1e9)  # 2 GB/s
    assert ours["intensity_flop_per_byte"] == pytest.approx(20.0)
    # ridge at 100 / 25 = 4 FLOP/byte: 20 FLOP/byte is compute-bound
    assert ours["roofline_bound"] == "compute" and ours["roofline_gflops"] == pytest.approx(100.0)
    assert ours["fraction_of_roofline"] == pytest.approx(0.4)
    assert ours["fraction_of_sgemm"] == pytest.approx(40.0 / (2 * 1024**3 / 0.02 / 1e9))
    assert ours["fraction_of_gemm"] == pytest.approx(40.0 / (2 * 1024**3 / 0.025 / 1e9))  # same-dtype GEMM, median
    bf16 = _row(rows, "aladin_fast_cpu_bf16", "rr")
    assert bf16["intensity_flop_per_byte"] == pytest.approx(40.0)
    assert bf16["fraction_of_gemm"] == pytest.approx(25.0 / (2 * 512**3 / 0.2 / 1e9))  # against the bf16 GEMM
    bandwidth = _row(rows, "aladin_fast_cpu_fp32", "bw")
    assert bandwidth["roofline_bound"] == "bandwidth"
    assert bandwidth["roofline_gflops"] == pytest.approx(2.0 * 25.0)  # intensity x read bandwidth
    assert bandwidth["fraction_of_roofline"] == pytest.approx(20.0 / 50.0)


def test_speedups_are_baseline_time_over_ours_within_one_op_and_shape():
    rows = report.build_rows(_raw())
    ours = _row(rows, "aladin_fast_cpu_fp32", "rr")
    assert ours["speedup_vs"] == {"torch_einsum_fp32": pytest.approx(4.0), "torch_compile_fp32": pytest.approx(2.0)}
    assert _row(rows, "aladin_fast_cpu_bf16", "rr")["speedup_vs"] == {
        "torch_einsum_fp32": pytest.approx(2.5), "torch_compile_fp32": pytest.approx(1.25)}
    # baselines against the other baselines only, never against aladin rows or another op's rows
    assert _row(rows, "torch_compile_fp32", "rr")["speedup_vs"] == {"torch_einsum_fp32": pytest.approx(2.0)}
    assert _row(rows, "torch_einsum_fp32", "rr", op="alignment_scores")["speedup_vs"] == {}
    assert "speedup_vs" not in _row(rows, "torch_mm_fp32", "1024^3", op="mm")


def test_compare_slowdown_direction_for_time_and_fractions():
    baseline = report.build_rows(_raw())
    slower = _raw()
    for bench in slower["benchmarks"]:
        if bench["extra_info"]["provider"] == "aladin_fast_cpu_fp32" and bench["extra_info"]["shape"] == "rr":
            bench["stats"].update(median=0.075, min=0.075)
    new = report.build_rows(slower)
    entry = next(e for e in report.compare(baseline, new, 0.1) if e["shape"] == "rr" and e["provider"].endswith("fp32"))
    assert entry["slowdown"] == pytest.approx(1.5) and entry["status"] == "regression"
    entry = next(e for e in report.compare(baseline, new, 0.1, metric="fraction_of_fma_peak")
                 if e["shape"] == "rr" and e["provider"].endswith("fp32"))
    assert entry["slowdown"] == pytest.approx(0.4 / (2e9 / 0.075 / 1e9 / 100.0))


def test_report_writes_strict_json(tmp_path):
    raw_path = tmp_path / "raw.json"
    raw_path.write_text(json.dumps(_raw()))
    assert report.main([str(raw_path), "--out", str(tmp_path), "--name", "m", "--no-plot"]) == 0

    def reject(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    result = json.loads((tmp_path / "m.json").read_text(), parse_constant=reject)
    assert result["peaks"]["fma_peak_gflops"] == 100.0
    assert _row(result["rows"], "aladin_fast_cpu_fp32", "rr")["speedup_vs"]["torch_einsum_fp32"] == pytest.approx(4.0)


# ------------------------------------------------------------------ the CPU plot
def test_speedup_panel_bars_match_their_baselines():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    import plot

    rows = [dict(provider="aladin_fast_cpu_fp32", shape="A", speedup_vs={"torch_einsum_fp32": 2.0,
                                                                          "fast_maxsim_fp32": 4.0}),
            dict(provider="aladin_fast_cpu_fp32", shape="B", speedup_vs={"torch_einsum_fp32": 3.0}),
            dict(provider="torch_einsum_fp32", shape="A", speedup_vs={"fast_maxsim_fp32": 2.0})]
    figure, axis = plt.subplots()
    try:
        plot._speedup_panel(axis, rows, "aladin_fast_cpu_fp32")
        bars = {container.get_label(): container for container in axis.containers}
        assert set(bars) == {"vs fast_maxsim_fp32", "vs torch_einsum_fp32"}
        assert [p.get_width() for p in bars["vs torch_einsum_fp32"].patches] == [2.0, 3.0]
        assert [p.get_width() for p in bars["vs fast_maxsim_fp32"].patches] == [4.0]
        assert bars["vs torch_einsum_fp32"].patches[0].get_facecolor() == to_rgba("tab:gray")
        # bars of baseline i (sorted) at shape position + i x 0.4; each tick in the middle of its group
        centres = {label: [p.get_y() + p.get_height() / 2 for p in c.patches] for label, c in bars.items()}
        assert centres["vs fast_maxsim_fp32"] == pytest.approx([0.0])
        assert centres["vs torch_einsum_fp32"] == pytest.approx([0.4, 1.4])
        assert list(axis.get_yticks()) == pytest.approx([0.2, 1.2])
        assert [t.get_text() for t in axis.get_yticklabels()] == ["A", "B"]
    finally:
        plt.close(figure)


def test_roofline_panel_draws_min_of_peak_and_bandwidth_times_intensity():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import plot

    rows = [dict(provider="aladin_fast_cpu_fp32", shape="s", op="rerank_scores", intensity_flop_per_byte=2.0,
                 gflops=30.0)]
    figure, axis = plt.subplots()
    try:
        plot._roofline_panel(axis, rows, {"fma_peak_gflops": 80.0, "read_bandwidth_gbs": 20.0, "sgemm_gflops": 60.0})
        roof = next(line for line in axis.get_lines() if line.get_label().startswith("roofline"))
        for x, y in zip(roof.get_xdata(), roof.get_ydata()):
            assert y == pytest.approx(min(80.0, 20.0 * x))
        assert 4.0 in list(roof.get_xdata())  # the ridge, 80 / 20 FLOP/byte
    finally:
        plt.close(figure)


# ------------------------------------------------------------------ GPU bookkeeping (no GPU: faked timers)
@pytest.fixture
def bench_gpu():
    """benchmarks/gpu/bench_gpu.py (imports triton at the top; nothing in it runs on a GPU here)."""
    pytest.importorskip("triton")
    import bench_gpu

    return bench_gpu


def test_quartiles_match_linear_interpolation(bench_gpu):
    import numpy as np

    generator = np.random.default_rng(0)
    for count in (1, 2, 3, 4, 7, 100):
        samples = list(generator.exponential(size=count))
        median, q25, q75 = bench_gpu.quartiles(samples)
        assert median == pytest.approx(float(np.percentile(samples, 50)))
        assert q25 == pytest.approx(float(np.percentile(samples, 25)))
        assert q75 == pytest.approx(float(np.percentile(samples, 75)))
    assert bench_gpu.quartiles([30.0, 10.0, 20.0]) == (20.0, 15.0, 25.0)


def test_slow_timing_reports_quartiles_not_min_and_max(bench_gpu, monkeypatch):
    """The 3-run event-timed path (full gallery): q25 / q75 must be quartiles, as do_bench's are."""
    durations = iter([30.0, 10.0, 20.0])

    class FakeEvent:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return next(durations)

    monkeypatch.setattr(bench_gpu.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(bench_gpu.torch.cuda, "synchronize", lambda: None)
    calls = []
    median, q25, q75 = bench_gpu.timed(lambda: calls.append(1), slow=True)
    assert len(calls) == 4  # one warm-up call, then three timed ones
    assert (median, q25, q75) == (20.0, 15.0, 25.0)


def test_record_units_tflops_and_gbytes_per_second(bench_gpu, monkeypatch):
    monkeypatch.setattr(bench_gpu, "ROWS", [])
    monkeypatch.setattr(bench_gpu, "DEADLINE", [float("inf")])
    monkeypatch.setattr(bench_gpu, "timed", lambda fn, slow=False: (2.0, 1.5, 2.5))  # milliseconds
    row = bench_gpu.record("s", "x", "p", None, flops=4e12, bytes_moved=1e9)
    assert row["tflops"] == pytest.approx(4e12 / 2e-3 / 1e12)  # 2,000 TFLOP/s
    assert row["gbps"] == pytest.approx(1e9 / 2e-3 / 1e9)  # 500 GB/s
    assert (row["median_ms"], row["q25_ms"], row["q75_ms"]) == (2.0, 1.5, 2.5)


def _fake_do_bench(times):
    """triton.testing.do_bench's reduction of a fixed list of times (its default return_mode is "mean")."""
    def do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        if quantiles is not None:
            return [float(torch.quantile(torch.tensor(times), q)) for q in quantiles]
        return {"mean": statistics.mean, "median": statistics.median, "min": min, "max": max}[return_mode](times)
    return do_bench


def test_machine_peaks_are_medians_like_the_rows(bench_gpu, monkeypatch):
    class FakeTensor:
        def __init__(self, count=0):
            self.count = count

        def numel(self):
            return self.count

    fake_torch = SimpleNamespace(randn=lambda *shape, **kwargs: FakeTensor(), bfloat16="bf16", uint8="u8",
                                 empty=lambda count, **kwargs: FakeTensor(count),
                                 empty_like=lambda tensor: FakeTensor(tensor.numel()))
    monkeypatch.setattr(bench_gpu, "torch", fake_torch)
    monkeypatch.setattr(bench_gpu, "do_bench", _fake_do_bench([1.0, 1.0, 1.0, 1.0, 6.0]))  # median 1, mean 2 ms
    measured = bench_gpu.machine_peaks()
    assert measured["torch_mm_bf16_8192_tflops"] == pytest.approx(2 * 8192**3 / 1e-3 / 1e12)
    assert measured["device_copy_gbps_read_plus_write"] == pytest.approx(2 * 2 * 2**30 / 1e-3 / 1e9)


def test_summarise_ratios_and_roofline_floors(bench_gpu, monkeypatch):
    flops, nbytes = 1.16e11, 7.16e7
    rows = [
        dict(suite="s", shape="x", provider="aladin_triton", dtype="bf16", flops=flops, bytes=nbytes, median_ms=2.0),
        dict(suite="s", shape="x", provider="aladin_triton_pair_kernel", dtype="bf16", flops=flops, bytes=nbytes,
             median_ms=1.0),
        dict(suite="s", shape="x", provider="torch_matmul_reshape", dtype="bf16", flops=flops, bytes=nbytes,
             median_ms=5.0),
        dict(suite="f", shape="x", provider="aladin_triton_gemm", dtype="fp32", flops=flops, bytes=nbytes,
             median_ms=4.0),
        dict(suite="f", shape="x", provider="aladin_triton_dense", dtype="fp32", flops=flops, bytes=nbytes,
             median_ms=6.0),
        dict(suite="f", shape="x", provider="torch_matmul_reshape", dtype="fp32", flops=flops, bytes=nbytes,
             median_ms=3.0),
        dict(suite="b", shape="y", provider="aladin_triton", dtype="bf16", flops=1e9, bytes=4.8e9, median_ms=2.0),
        dict(suite="s", shape="x", provider="late-interaction-kernels", dtype="bf16", error="boom"),
    ]
    for row in rows:
        if "median_ms" in row:
            row["tflops"] = row["flops"] / row["median_ms"] / 1e9
    monkeypatch.setattr(bench_gpu, "ROWS", rows)
    published = bench_gpu.summarise({"gpu": "NVIDIA H200"}, {"torch_mm_bf16_8192_tflops": 800.0})
    assert published["part"] == "H200" and published["bf16_tflops"] == 989.4
    by = {(r["suite"], r["provider"]): r for r in rows}
    # speed-up = provider time / ours: ours is the default "aladin_triton" where measured ...
    assert by["s", "torch_matmul_reshape"]["aladin_speedup_vs_this"] == pytest.approx(2.5)
    assert by["s", "aladin_triton_pair_kernel"]["aladin_speedup_vs_this"] == pytest.approx(0.5)
    # ... else the best aladin row of the (suite, shape)
    assert by["f", "torch_matmul_reshape"]["aladin_speedup_vs_this"] == pytest.approx(0.75)
    assert by["s", "aladin_triton"]["fraction_of_measured_mm_bf16"] == pytest.approx(58.0 / 800.0)
    assert by["s", "aladin_triton"]["fraction_of_published_bf16_peak"] == pytest.approx(58.0 / 989.4)
    # compute floors in ms: flops / (TFLOP/s x 1e12) x 1e3, at the row's own dtype's peak
    bf16_floor = flops / 989.4e12 * 1e3
    assert by["s", "aladin_triton"]["roofline_floor_ms"] == pytest.approx(bf16_floor)
    assert by["s", "aladin_triton"]["time_over_roofline_floor"] == pytest.approx(2.0 / bf16_floor)
    # fp32 rows (IEEE fp32 dots) against the H200's 66.9 TFLOP/s fp32 rate, not its bf16 tensor-core rate
    fp32_floor = flops / 66.9e12 * 1e3
    assert by["f", "torch_matmul_reshape"]["roofline_floor_ms"] == pytest.approx(fp32_floor, rel=1e-3)
    assert by["f", "torch_matmul_reshape"]["time_over_roofline_floor"] == pytest.approx(3.0 / fp32_floor, rel=1e-3)
    # a bandwidth floor: 4.8 GB over 4.8 TB/s = 1 ms
    assert by["b", "aladin_triton"]["roofline_floor_ms"] == pytest.approx(1.0)
    assert "aladin_speedup_vs_this" not in by["s", "late-interaction-kernels"]


def test_published_peaks(bench_gpu):
    assert bench_gpu.published_peak("NVIDIA H100 80GB HBM3")["hbm_tbps"] == 3.35
    assert bench_gpu.published_peak("NVIDIA A100-SXM4-80GB")["bf16_tflops"] == 312.0
    assert bench_gpu.published_peak("Tesla T4") == {}
    for part in bench_gpu.PUBLISHED.values():
        assert part["bf16_tflops"] > part["fp32_tflops"] > 0
    assert math.isclose(bench_gpu.PUBLISHED["H200"]["bf16_tflops"] / bench_gpu.PUBLISHED["H200"]["fp32_tflops"],
                        14.79, rel_tol=1e-3)
