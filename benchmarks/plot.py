"""Plots of a benchmark results file (benchmarks/report.py output): speed-ups and a roofline.

    python benchmarks/plot.py benchmarks/results/<machine>.json [OUT.png]

Left panels: for each aladin_fast provider, its speed-up over every baseline
provider, one group of bars per shape (1 = as fast as the baseline). Right
panel: the roofline of the run -- the raw FMA peak, the read-bandwidth roof
(intensity x bandwidth) and torch.mm's sgemm rate -- with every provider's
achieved GFLOP/s at its shape's arithmetic intensity (FLOP per byte, each input
read once).
"""
from __future__ import annotations

import json
import sys

PROVIDER_STYLE = {  # colour, marker
    "aladin_fast_cpu_fp32": ("tab:orange", "o"),
    "aladin_fast_cpu_bf16": ("tab:red", "D"),
    "aladin_fast_triton_fp32": ("tab:orange", "o"),
    "aladin_fast_triton_bf16": ("tab:red", "D"),
    "torch_einsum_fp32": ("tab:gray", "s"),
    "torch_matmul_reshape_fp32": ("tab:blue", "^"),
    "torch_compile_fp32": ("tab:green", "v"),
    "torch_eager_fp32": ("tab:brown", "s"),
    "fast_maxsim_fp32": ("tab:purple", "P"),
}


def _style(provider: str):
    return PROVIDER_STYLE.get(provider, ("black", "x"))


def _speedup_panel(axis, rows: list[dict], provider: str) -> None:
    from matplotlib.ticker import FuncFormatter

    subset = [r for r in rows if r["provider"] == provider and r.get("speedup_vs")]
    baselines = sorted({b for r in subset for b in r["speedup_vs"]})
    height = 0.8 / max(1, len(baselines))
    for index, baseline in enumerate(baselines):
        ys, values = [], []
        for position, row in enumerate(subset):
            if baseline in row["speedup_vs"]:
                ys.append(position + index * height)
                values.append(row["speedup_vs"][baseline])
        bars = axis.barh(ys, values, height=height, color=_style(baseline)[0], label=f"vs {baseline}")
        axis.bar_label(bars, labels=[f"{v:.1f}x" for v in values], fontsize=6, padding=2)
    axis.set_yticks([p + 0.4 - height / 2 for p in range(len(subset))])
    axis.set_yticklabels([r["shape"] for r in subset], fontsize=7)
    axis.invert_yaxis()
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}x" if value in (0.5, 2, 3, 5, 20) else ""))
    axis.tick_params(axis="x", which="both", labelsize=7)
    axis.set_xlabel(f"speed-up of {provider} over each baseline (log; higher is better)", fontsize=8)
    axis.set_title(provider, fontsize=9)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)


def _roofline_panel(axis, rows: list[dict], peaks: dict) -> None:
    fma, bandwidth, sgemm = peaks.get("fma_peak_gflops"), peaks.get("read_bandwidth_gbs"), peaks.get("sgemm_gflops")
    points = [r for r in rows if r.get("intensity_flop_per_byte") and r.get("gflops") and r.get("op") != "mm"]
    intensities = [r["intensity_flop_per_byte"] for r in points] or [1.0]
    low, high = min(intensities) / 2, max(intensities) * 2
    if fma and bandwidth:
        ridge = fma / bandwidth
        low, high = min(low, ridge / 4), max(high, ridge * 4)
        xs = [low, ridge, high]
        axis.plot(xs, [min(fma, x * bandwidth) for x in xs], color="black", linewidth=1.5,
                  label=f"roofline: FMA {fma:.0f} GFLOP/s, read {bandwidth:.1f} GB/s")
    if sgemm:
        axis.axhline(sgemm, color="tab:blue", linestyle="--", linewidth=1, label=f"torch.mm sgemm {sgemm:.0f} GFLOP/s")
    seen = set()
    for row in points:
        colour, marker = _style(row["provider"])
        label = row["provider"] if row["provider"] not in seen else None
        seen.add(row["provider"])
        axis.scatter(row["intensity_flop_per_byte"], row["gflops"], color=colour, marker=marker, s=28, label=label,
                     zorder=3, alpha=0.85)
        if row["provider"].endswith("cpu_fp32") or row["provider"].endswith("triton_fp32"):
            axis.annotate(row["shape"], (row["intensity_flop_per_byte"], row["gflops"]), fontsize=5,
                          xytext=(4, 2), textcoords="offset points", color=colour)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlim(low, high)
    axis.set_xlabel("arithmetic intensity (FLOP / byte, each input read once)", fontsize=8)
    axis.set_ylabel("achieved GFLOP/s", fontsize=8)
    axis.set_title("roofline of this run", fontsize=9)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    axis.grid(True, which="both", linewidth=0.3)


def plot_results(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    aladin = sorted({r["provider"] for r in rows if r["provider"].startswith("aladin_fast") and r.get("speedup_vs")},
                    key=lambda name: (not name.endswith("fp32"), name))
    shapes = max([len({r["shape"] for r in rows if r["provider"] == p}) for p in aladin] or [1])
    panels = len(aladin) + 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, max(5.5, 0.6 * shapes + 3)), squeeze=False)
    for axis, provider in zip(axes[0], aladin):
        _speedup_panel(axis, rows, provider)
    _roofline_panel(axes[0][-1], rows, result.get("peaks", {}))
    machine = result.get("machine", {})
    fig.suptitle(f"{machine.get('cpu', '?')}, {machine.get('threads', '?')} threads, torch {machine.get('torch', '?')}"
                 f" ({result.get('datetime', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    with open(argv[0]) as handle:
        result = json.load(handle)
    out = argv[1] if len(argv) > 1 else argv[0].rsplit(".", 1)[0] + ".png"
    print(f"wrote {plot_results(result, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
