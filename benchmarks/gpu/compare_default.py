"""The default backward ("auto") against late-interaction-kernels and the other strategies, interleaved.

Training shape (bf16 unit vectors, 128 x 128, W=32, R=36, upstream = logsumexp over images), D = 1024 and 768.
Host-bound steps vary between processes and over time, so every provider is timed in each of ``--rounds``
rounds (do_bench each, the median step of the round; session 5 used its mean) and the medians over rounds are reported, with each round's ratio to the peer.

    python benchmarks/gpu/compare_default.py [--out compare.json] [--rounds 5] [--plot compare.png] [--graphs]
    python benchmarks/gpu/compare_default.py --plot-only compare.json --plot compare.png   (no GPU needed)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from triton.testing import do_bench

import aladin_fast


def plot(rows, out):
    """Every round of every provider (dots) and its median (bar), one panel per D."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({row["dim"] for row in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 3.6), squeeze=False)
    for ax, dim in zip(axes[0], dims):
        items = [row for row in rows if row["dim"] == dim]
        for y, row in enumerate(items):
            peer = row["provider"].startswith("late-interaction")
            ax.barh(y, row["median_ms"], color="tab:gray" if peer else "tab:blue", alpha=0.5)
            ax.plot(row["rounds_ms"], [y] * len(row["rounds_ms"]), "k.", markersize=4)
        ax.set_yticks(range(len(items)), [row["provider"] for row in items])
        ax.invert_yaxis()
        ax.set_xlabel("fwd+bwd ms (bar: median over rounds; dots: rounds)")
        ax.set_title(f"128 x 128, W32 R36 D{dim}, bf16")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--plot", default=None, help="write a plot of the rounds here")
    parser.add_argument("--plot-only", default=None, help="plot an earlier run's JSON and stop")
    parser.add_argument("--graphs", action="store_true",
                        help="also time ours and the peer with each step captured in a CUDA graph")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.load(open(args.plot_only))["rows"], args.plot or args.plot_only.replace(".json", ".png"))
        return
    import late_interaction_kernels as lik

    results = []
    for dim in (1024, 768):
        gen = torch.Generator(device="cuda").manual_seed(dim)
        text = torch.nn.functional.normalize(torch.randn(128, 32, dim, device="cuda", generator=gen), dim=-1)
        images = torch.nn.functional.normalize(torch.randn(128, 36, dim, device="cuda", generator=gen), dim=-1)
        text, images = text.bfloat16().requires_grad_(), images.bfloat16().requires_grad_()

        def provider(aggregation, strategy):
            def step():
                os.environ["ALADIN_FAST_TRITON_BACKWARD"] = strategy
                text.grad = images.grad = None
                aladin_fast.alignment_scores(text, images, aggregation=aggregation,
                                             backend="triton").float().logsumexp(1).sum().backward()
            return step

        def peer():
            text.grad = images.grad = None
            lik.maxsim(text, images).float().logsumexp(1).sum().backward()
        def graphed(step):
            """The step captured in a CUDA graph (one replay per step: no host time), or None where the
            provider cannot be captured (a host sync inside). Inputs stay the same tensors (static)."""
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                graph.replay()
                torch.cuda.synchronize()
                return graph.replay
            except Exception as err:  # noqa: BLE001 - a provider that cannot be captured is reported, not fatal
                print(f"D{dim}: CUDA-graph capture failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
                torch.cuda.synchronize()
                return None

        providers = {"late-interaction-kernels MrSw": peer, "auto MrSw": provider("MrSw", "auto"),
                     "dense MrSw": provider("MrSw", "dense"), "auto MwSr": provider("MwSr", "auto"),
                     "segmented MwSr": provider("MwSr", "segmented"), "auto symm": provider("symm", "auto"),
                     "segmented symm": provider("symm", "segmented")}
        if args.graphs:  # both sides captured: GPU time per step, what a host running ahead would see
            os.environ["ALADIN_FAST_TRITON_BACKWARD"] = "auto"
            for name, step in (("late-interaction-kernels MrSw (CUDA graph)", peer),
                               ("auto MrSw (CUDA graph)", provider("MrSw", "auto"))):
                replay = graphed(step)
                if replay is not None:
                    providers[name] = replay
        times = {name: [] for name in providers}
        for fn in providers.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in providers.items():
                times[name].append(do_bench(fn, warmup=10, rep=60, return_mode="median"))
        for name, values in times.items():
            # captured steps against the captured peer (when it could be captured), eager against eager
            graph_peer = "late-interaction-kernels MrSw (CUDA graph)"
            peer_times = times[graph_peer if "(CUDA graph)" in name and graph_peer in times
                               else "late-interaction-kernels MrSw"]
            row = dict(dim=dim, provider=name, median_ms=statistics.median(values), rounds_ms=values,
                       peer_over_ours=[p / v for p, v in zip(peer_times, values)])
            results.append(row)
            print(f"D{dim} {name:32s} median {row['median_ms']:.3f} ms  rounds "
                  + " ".join(f"{v:.3f}" for v in values)
                  + "  peer/ours " + " ".join(f"{r:.2f}" for r in row["peer_over_ours"]), flush=True)
    os.environ.pop("ALADIN_FAST_TRITON_BACKWARD", None)
    if args.plot:
        plot(results, args.plot)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=results), f, indent=1)


if __name__ == "__main__":
    main()
