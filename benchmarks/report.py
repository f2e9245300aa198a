"""Turn a pytest-benchmark JSON file into benchmarks/results/<machine>.json and a plot.

    python benchmarks/report.py RAW.json [--out benchmarks/results]

Each row: op, shape, dtype, provider, median and IQR time, GFLOP/s, GB/s, the
fraction of the same run's torch.mm GEMM rate (sgemm for fp32 rows, bf16 GEMM
for bf16 rows), and the speed-up of each aladin_fast row over every baseline
provider of the same shape.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_flags, cpu_model, machine_name  # noqa: E402


def build_rows(raw: dict) -> list[dict]:
    rows = []
    for bench in raw["benchmarks"]:
        info, stats = bench.get("extra_info", {}), bench["stats"]
        if "provider" not in info:
            continue
        median = stats["median"]
        row = dict(info)
        row.update(
            median_s=median, iqr_s=stats["iqr"], rounds=stats["rounds"],
            gflops=info.get("flops", 0.0) / median / 1e9 if median else None,
            gbytes_per_s=info.get("bytes", 0.0) / median / 1e9 if median and info.get("bytes") else None,
        )
        rows.append(row)
    gemm = {row["dtype"]: row["gflops"] for row in rows if row["op"] == "mm"}
    for row in rows:
        if row["op"] != "mm" and row["dtype"] in gemm:
            row["fraction_of_gemm"] = row["gflops"] / gemm[row["dtype"]]
            row["fraction_of_sgemm"] = row["gflops"] / gemm.get("float32", float("nan"))
    for row in rows:
        if not row["provider"].startswith("aladin_fast"):
            continue
        baselines = [other for other in rows if other["shape"] == row["shape"] and not other["provider"].startswith("aladin_fast")]
        row["speedup_vs"] = {other["provider"]: other["median_s"] / row["median_s"] for other in baselines}
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({row["shape"] for row in rows if row["op"] != "mm"})
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(6 * max(1, len(shapes)), 4.5), squeeze=False)
    gemm = {row["dtype"]: row["gflops"] for row in rows if row["op"] == "mm"}
    for axis, shape in zip(axes[0], shapes):
        subset = [row for row in rows if row["shape"] == shape]
        names = [row["provider"] for row in subset]
        values = [row["gflops"] for row in subset]
        colors = ["tab:orange" if name.startswith("aladin_fast") else "tab:gray" for name in names]
        axis.barh(names, values, color=colors)
        for dtype, rate in gemm.items():
            axis.axvline(rate, linestyle="--", linewidth=1, label=f"torch.mm {dtype}: {rate:.0f} GFLOP/s")
        axis.set_title(shape, fontsize=9)
        axis.set_xlabel("GFLOP/s (higher is better)")
        axis.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("raw", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    with open(args.raw) as handle:
        raw = json.load(handle)
    rows = build_rows(raw)
    machine = raw.get("machine_info", {})
    cpu = cpu_model()
    name = machine_name(prefer_gpu=False)
    import torch

    result = {
        "machine": {
            "cpu": cpu, "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(),
            "python": machine.get("python_version"), "torch": torch.__version__,
            "threads": rows[0]["threads"] if rows else None,
        },
        "datetime": raw.get("datetime"),
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{name}.json")
    with open(json_path + ".tmp", "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(json_path + ".tmp", json_path)
    plot(rows, os.path.join(args.out, f"{name}.png"))
    for row in rows:
        extra = ""
        if "fraction_of_gemm" in row:
            extra = f"  {100 * row['fraction_of_gemm']:.0f}% of torch.mm {row['dtype']}"
        if row.get("speedup_vs"):
            extra += "  " + ", ".join(f"{v:.2f}x vs {k}" for k, v in row["speedup_vs"].items())
        print(f"{row['shape']:<30} {row['provider']:<28} {row['median_s'] * 1e3:9.3f} ms {row['gflops']:8.1f} GFLOP/s{extra}")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
