"""Benchmark results: pytest-benchmark JSON -> benchmarks/results/<machine>.json + plot, and compare mode.

    python benchmarks/report.py RAW.json [--out benchmarks/results] [--name NAME]
    python benchmarks/report.py --compare BASELINE.json NEW.json [--threshold 0.1] [--metric time]

Each row (one provider on one shape): median / IQR / best time, achieved GFLOP/s,
the percentage of the run's raw FMA peak, the bytes moved if each input is read
once and the arithmetic intensity, the percentage of the roofline
min(FMA peak, intensity x read bandwidth), the percentage of the run's
torch.mm sgemm (and of the same-dtype torch GEMM), and its speed-up over every
baseline provider of the same shape. The ceilings are the best values the run
measured (benchmarks/peaks.py; every row carries them, and test_bench_peaks.py
adds probe rows).

Compare mode exits 1 when an aladin_fast row of BASELINE got slower by more
than the threshold in NEW (``--metric time``, or ``fraction_of_sgemm`` /
``fraction_of_fma_peak`` to factor out a machine that is busier than it was).
Both files may be report outputs or raw pytest-benchmark JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_flags, cpu_model, machine_name  # noqa: E402

ALADIN_PREFIX = "aladin_fast"
COMPARE_METRICS = ("time", "fraction_of_sgemm", "fraction_of_fma_peak")


def is_aladin(provider: str) -> bool:
    return provider.startswith(ALADIN_PREFIX)


def _raw_rows(raw: dict) -> list[dict]:
    rows = []
    for bench in raw["benchmarks"]:
        info, stats = bench.get("extra_info", {}), bench["stats"]
        if "provider" not in info:
            continue
        row = dict(info)
        row.update(median_s=stats["median"], iqr_s=stats["iqr"], min_s=stats["min"], rounds=stats["rounds"])
        rows.append(row)
    return rows


def run_peaks(rows: list[dict]) -> dict:
    """The run's ceilings: the best value of every probe seen in the run (load only lowers them)."""

    def best(values):
        values = [v for v in values if isinstance(v, (int, float)) and v > 0]
        return max(values) if values else None

    sgemm_rows = [r["flops"] / r["min_s"] / 1e9 for r in rows if r.get("op") == "mm" and r.get("dtype") == "float32"]
    return {
        "fma_peak_gflops": best([r.get("fma_peak_gflops") for r in rows] + [r.get("measured_gflops") for r in rows]),
        "read_bandwidth_gbs": best([r.get("read_bandwidth_gbs") for r in rows] + [r.get("measured_gbs") for r in rows]),
        "sgemm_gflops": best([r.get("sgemm_gflops") for r in rows] + sgemm_rows),
    }


def annotate(rows: list[dict], peaks: dict) -> list[dict]:
    """Adds the derived columns (see the module docstring) to every timed row, in place."""
    gemm = {r["dtype"]: r["flops"] / r["median_s"] / 1e9 for r in rows if r.get("op") == "mm"}
    fma, bandwidth, sgemm = peaks["fma_peak_gflops"], peaks["read_bandwidth_gbs"], peaks["sgemm_gflops"]
    for row in rows:
        if row.get("op") == "probe" or not row.get("flops"):
            continue
        median = row["median_s"]
        row["gflops"] = row["flops"] / median / 1e9
        row["gflops_best"] = row["flops"] / row["min_s"] / 1e9 if row.get("min_s") else None
        if fma:
            row["fraction_of_fma_peak"] = row["gflops"] / fma
        if row.get("bytes"):
            row["gbytes_per_s"] = row["bytes"] / median / 1e9
            row["intensity_flop_per_byte"] = row["flops"] / row["bytes"]
            if fma and bandwidth:
                memory_roof = row["intensity_flop_per_byte"] * bandwidth
                row["roofline_gflops"] = min(fma, memory_roof)
                row["roofline_bound"] = "compute" if fma <= memory_roof else "bandwidth"
                row["fraction_of_roofline"] = row["gflops"] / row["roofline_gflops"]
        if row.get("op") != "mm":
            if sgemm:
                row["fraction_of_sgemm"] = row["gflops"] / sgemm
            if row.get("dtype") in gemm:
                row["fraction_of_gemm"] = row["gflops"] / gemm[row["dtype"]]
    for row in rows:
        if row.get("op") in ("mm", "probe"):
            continue
        row["speedup_vs"] = {
            other["provider"]: other["median_s"] / row["median_s"]
            for other in rows
            if other.get("op") == row.get("op") and other["shape"] == row["shape"]
            and other["provider"] != row["provider"] and not is_aladin(other["provider"])
        }
    return rows


def build_rows(raw: dict) -> list[dict]:
    rows = _raw_rows(raw)
    return annotate(rows, run_peaks(rows))


def load_rows(path: str) -> tuple[list[dict], dict]:
    """(rows, machine) of a report output or of a raw pytest-benchmark JSON file."""
    with open(path) as handle:
        data = json.load(handle)
    if "benchmarks" in data:
        return build_rows(data), data.get("machine_info", {})
    return data["rows"], data.get("machine", {})


# ------------------------------------------------------------------ compare
def _metric_value(row: dict, metric: str):
    """Higher is better: 1 / median time, or a fraction of a ceiling."""
    if metric == "time":
        return 1.0 / row["median_s"] if row.get("median_s") else None
    return row.get(metric)


def compare(baseline: list[dict], new: list[dict], threshold: float = 0.1, metric: str = "time") -> list[dict]:
    """One entry per aladin_fast row of ``baseline``: its slowdown in ``new`` and whether that is
    a regression (slowdown > 1 + threshold) or the row is missing from ``new``."""
    if metric not in COMPARE_METRICS:
        raise ValueError(f"metric must be one of {COMPARE_METRICS}, got {metric!r}")
    index = {(r.get("op"), r.get("shape"), r["provider"]): r for r in new}
    results = []
    for row in baseline:
        if not is_aladin(row["provider"]) or row.get("op") in ("mm", "probe"):
            continue
        key = (row.get("op"), row.get("shape"), row["provider"])
        entry = {"op": key[0], "shape": key[1], "provider": key[2], "metric": metric}
        other = index.get(key)
        before = _metric_value(row, metric)
        after = _metric_value(other, metric) if other else None
        if other is None or not before or not after:
            entry.update(status="missing", slowdown=None)
        else:
            slowdown = before / after
            entry.update(slowdown=slowdown, status="regression" if slowdown > 1.0 + threshold else "ok")
        results.append(entry)
    return results


def compare_main(baseline_path: str, new_path: str, threshold: float, metric: str, strict: bool) -> int:
    baseline, baseline_machine = load_rows(baseline_path)
    new, new_machine = load_rows(new_path)
    results = compare(baseline, new, threshold, metric)
    if baseline_machine.get("cpu") != new_machine.get("cpu"):
        print(f"warning: different machines: {baseline_machine.get('cpu')!r} vs {new_machine.get('cpu')!r}")
    for entry in results:
        slowdown = "-" if entry["slowdown"] is None else f"{entry['slowdown']:.3f}x"
        print(f"{entry['status']:<10} {entry['shape']:<36} {entry['provider']:<24} slowdown {slowdown}")
    regressions = [e for e in results if e["status"] == "regression"]
    missing = [e for e in results if e["status"] == "missing"]
    print(f"{len(results)} aladin rows compared on {metric}, threshold {threshold:.0%}: "
          f"{len(regressions)} regressions, {len(missing)} missing")
    if not results:
        print("error: the baseline has no aladin_fast rows")
        return 2
    return 1 if regressions or (strict and missing) else 0


# ------------------------------------------------------------------ report
def _percent(row: dict, key: str) -> str:
    return f"{100 * row[key]:5.1f}%" if row.get(key) is not None else "    - "


def print_table(rows: list[dict], peaks: dict) -> None:
    print(f"run peaks: FMA {peaks['fma_peak_gflops'] or 0:.1f} GFLOP/s, read bandwidth "
          f"{peaks['read_bandwidth_gbs'] or 0:.1f} GB/s, torch.mm sgemm {peaks['sgemm_gflops'] or 0:.1f} GFLOP/s")
    print(f"{'shape':<36} {'provider':<26} {'ms':>9} {'GFLOP/s':>8} {'%FMA':>6} {'%roof':>6} {'%sgemm':>6}  speed-up")
    for row in rows:
        if row.get("op") == "probe" or "gflops" not in row:
            continue
        speedups = ", ".join(f"{v:.2f}x {k}" for k, v in (row.get("speedup_vs") or {}).items())
        print(f"{row['shape']:<36} {row['provider']:<26} {row['median_s'] * 1e3:9.3f} {row['gflops']:8.1f} "
              f"{_percent(row, 'fraction_of_fma_peak')} {_percent(row, 'fraction_of_roofline')} "
              f"{_percent(row, 'fraction_of_sgemm')}  {speedups}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", nargs="?", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--name", default=None, help="output file name without extension (default: the machine)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--compare", nargs=2, metavar=("BASELINE", "NEW"))
    parser.add_argument("--threshold", type=float, default=0.1, help="allowed slowdown (0.1 = 10%%)")
    parser.add_argument("--metric", choices=COMPARE_METRICS, default="time")
    parser.add_argument("--strict", action="store_true", help="compare: a missing aladin row also fails")
    args = parser.parse_args(argv)
    if args.compare:
        return compare_main(*args.compare, args.threshold, args.metric, args.strict)
    if not args.raw:
        parser.error("RAW.json or --compare BASELINE NEW is required")
    with open(args.raw) as handle:
        raw = json.load(handle)
    rows = _raw_rows(raw)
    peaks = run_peaks(rows)
    annotate(rows, peaks)
    machine = raw.get("machine_info", {})
    probe = next((r["peak_probe"] for r in rows if r.get("peak_probe")), {})
    result = {
        "machine": {
            "cpu": cpu_model(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(),
            "python": machine.get("python_version"), "torch": probe.get("torch"),
            "threads": rows[0].get("threads") if rows else None, "kernel_isa": probe.get("isa"),
        },
        "peaks": peaks,
        "datetime": raw.get("datetime"),
        "rows": rows,
    }
    name = args.name or machine_name(prefer_gpu=False)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{name}.json")
    with open(json_path + ".tmp", "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(json_path + ".tmp", json_path)
    print_table(rows, peaks)
    print(f"wrote {json_path}")
    if not args.no_plot:
        from plot import plot_results

        print(f"wrote {plot_results(result, os.path.join(args.out, f'{name}.png'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
