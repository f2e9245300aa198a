"""Plot a bench_gpu.py results JSON: median time per provider for every (suite, shape), log scale, ours first.

    python benchmarks/gpu/plot_gpu.py results.json out.png
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path: str, out: str) -> None:
    data = json.load(open(path))
    rows = [row for row in data["rows"] if "median_ms" in row and not row["suite"].startswith("sweep")]
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["suite"], row["shape"]), []).append(row)
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.2 * len(groups)), squeeze=False)
    for ax, ((suite, shape), items) in zip(axes[:, 0], groups.items()):
        items.sort(key=lambda r: (not r["provider"].startswith("aladin"), r["median_ms"]))
        names = [r["provider"] for r in items]
        times = [r["median_ms"] for r in items]
        colors = ["tab:blue" if n.startswith("aladin") else "tab:gray" for n in names]
        ax.barh(names, times, color=colors)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(f"{suite}  {shape}", fontsize=9)
        ax.tick_params(labelsize=7)
        for y, t in enumerate(times):
            ax.text(t, y, f" {t:.3g} ms", va="center", fontsize=6)
    machine = data["machine"]
    fig.suptitle(f"{machine['gpu']}  torch {machine['torch']}  triton {machine['triton']}  (median ms, lower is "
                 "better)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
