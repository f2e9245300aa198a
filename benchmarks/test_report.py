"""Unit tests of benchmarks/report.py on hand-made pytest-benchmark JSON (no timing involved)."""
import json

import pytest

import report


def _bench(provider, shape, median_s, op="rerank_scores", dtype="float32", flops=2e9, nbytes=1e8, **extra):
    info = dict(op=op, shape=shape, provider=provider, dtype=dtype, flops=flops, bytes=nbytes, threads=2,
                fma_peak_gflops=80.0, read_bandwidth_gbs=10.0, sgemm_gflops=60.0, **extra)
    return {"extra_info": info, "stats": {"median": median_s, "iqr": 0.0, "min": median_s, "rounds": 5}}


def _raw(aladin_s=0.05, einsum_s=0.2):
    return {
        "datetime": "2026-01-01T00:00:00",
        "machine_info": {"python_version": "3.11"},
        "benchmarks": [
            {"extra_info": dict(op="probe", shape="fma_peak", provider="probe_fma_peak", dtype="float32",
                                measured_gflops=100.0), "stats": {"median": 0.3, "iqr": 0.0, "min": 0.3, "rounds": 5}},
            _bench("torch_mm_fp32", "2048^3", 2 * 2048**3 / 50e9, op="mm", nbytes=None),
            _bench("aladin_fast_cpu_fp32", "compute_bound", aladin_s),  # 40 GFLOP/s at 20 FLOP/byte
            _bench("torch_einsum_fp32", "compute_bound", einsum_s),
            _bench("aladin_fast_cpu_fp32", "memory_bound", 0.1, flops=2e8, nbytes=1e8),  # 2 FLOP/byte
            _bench("torch_einsum_fp32", "memory_bound", 0.4, flops=2e8, nbytes=1e8),
        ],
    }


def _row(rows, provider, shape):
    return next(r for r in rows if r["provider"] == provider and r["shape"] == shape)


def test_rows_carry_peak_fractions_roofline_and_speedups():
    rows = report.build_rows(_raw())
    peaks = report.run_peaks(rows)
    assert peaks == {"fma_peak_gflops": 100.0, "read_bandwidth_gbs": 10.0, "sgemm_gflops": pytest.approx(60.0)}
    compute = _row(rows, "aladin_fast_cpu_fp32", "compute_bound")
    assert compute["gflops"] == pytest.approx(40.0)
    assert compute["fraction_of_fma_peak"] == pytest.approx(0.4)
    assert compute["intensity_flop_per_byte"] == pytest.approx(20.0)
    assert compute["roofline_gflops"] == pytest.approx(100.0) and compute["roofline_bound"] == "compute"
    assert compute["fraction_of_sgemm"] == pytest.approx(40.0 / 60.0)
    assert compute["speedup_vs"] == {"torch_einsum_fp32": pytest.approx(4.0)}
    memory = _row(rows, "aladin_fast_cpu_fp32", "memory_bound")
    assert memory["roofline_gflops"] == pytest.approx(20.0) and memory["roofline_bound"] == "bandwidth"
    assert memory["fraction_of_roofline"] == pytest.approx(0.1)
    # baselines get ratios to the other baselines only; the probe rows are left alone
    assert _row(rows, "torch_einsum_fp32", "compute_bound")["speedup_vs"] == {}
    assert "gflops" not in _row(rows, "probe_fma_peak", "fma_peak")


def test_compare_flags_only_aladin_regressions_beyond_threshold():
    baseline = report.build_rows(_raw(aladin_s=0.05))
    same = report.compare(baseline, report.build_rows(_raw(aladin_s=0.054)), threshold=0.1)
    assert {e["status"] for e in same} == {"ok"} and len(same) == 2
    slower = report.compare(baseline, report.build_rows(_raw(aladin_s=0.06, einsum_s=0.5)), threshold=0.1)
    regression = next(e for e in slower if e["shape"] == "compute_bound")
    assert regression["status"] == "regression" and regression["slowdown"] == pytest.approx(1.2)
    # a baseline provider getting slower is not our regression
    assert all(e["provider"].startswith("aladin_fast") for e in slower)
    new_rows = [r for r in report.build_rows(_raw()) if r["shape"] != "memory_bound"]
    assert {e["shape"]: e["status"] for e in report.compare(baseline, new_rows)}["memory_bound"] == "missing"
    with pytest.raises(ValueError, match="metric"):
        report.compare(baseline, baseline, metric="nope")


def test_compare_on_fraction_of_sgemm_factors_out_a_slower_machine():
    baseline = report.build_rows(_raw(aladin_s=0.05))
    busier = _raw(aladin_s=0.075)  # 1.5x slower, but so is the machine's sgemm
    for bench in busier["benchmarks"]:
        bench["extra_info"]["sgemm_gflops"] = 40.0
        if bench["extra_info"]["op"] == "mm":
            bench["stats"]["min"] = bench["stats"]["median"] = 2 * 2048**3 / 40e9
    new = report.build_rows(busier)
    assert any(e["status"] == "regression" for e in report.compare(baseline, new, metric="time"))
    assert {e["status"] for e in report.compare(baseline, new, metric="fraction_of_sgemm")} == {"ok"}


def test_compare_command_exit_codes(tmp_path, capsys):
    paths = {}
    for name, seconds in (("base", 0.05), ("same", 0.05), ("slow", 0.1)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(_raw(aladin_s=seconds)))
    assert report.main(["--compare", str(paths["base"]), str(paths["same"])]) == 0
    assert report.main(["--compare", str(paths["base"]), str(paths["slow"]), "--threshold", "0.1"]) == 1
    assert report.main(["--compare", str(paths["base"]), str(paths["slow"]), "--threshold", "1.5"]) == 0
    assert "regression" in capsys.readouterr().out


def test_report_writes_results_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    raw_path = tmp_path / "raw.json"
    raw_path.write_text(json.dumps(_raw()))
    assert report.main([str(raw_path), "--out", str(tmp_path), "--name", "machine"]) == 0
    result = json.loads((tmp_path / "machine.json").read_text())
    assert result["peaks"]["fma_peak_gflops"] == 100.0
    assert {r["provider"] for r in result["rows"]} >= {"aladin_fast_cpu_fp32", "torch_einsum_fp32"}
    assert (tmp_path / "machine.png").stat().st_size > 10_000
    # a report output compares against itself (no regression)
    assert report.main(["--compare", str(tmp_path / "machine.json"), str(raw_path)]) == 0
