"""Bounded loopback load test of the serving layer, with and without dynamic batching.

    .venv/bin/python benchmarks/load_test_serving.py                  # 5,000 images, R=36, D=1024
    .venv/bin/python benchmarks/load_test_serving.py --quick          # small gallery, seconds

What it does:

1. builds a random gallery (``--images`` items, ``--regions`` regions of
   ``--dim`` features, ``--store-dtype``; student embeddings of size
   ``--embed-dim``, exact inner-product index) and saves it as a Retriever
   directory in a temporary folder;
2. for each server setting (``batched``: ``--max-batch-size``/``--max-wait-ms``;
   ``unbatched``: max_batch_size=1, one request at a time) starts
   ``python -m aladin_fast.serving.cli`` in a subprocess on 127.0.0.1 and
   drives it with a closed-loop asyncio client: ``--concurrency`` keep-alive
   connections, each sending its next ``POST /search`` (``rerank_k``, ``k``,
   captions of ``--words`` words as base64 float32) as soon as the previous
   one returns, until ``--requests`` requests are done or ``--duration`` s
   passed (after ``--warmup`` unmeasured requests);
3. reports throughput (requests/s), p50/p90/p99 latency, the server's mean
   batch size (from ``GET /metrics``) and the speed-ups, and writes them to
   ``benchmarks/results/serving-<machine>.json``.

The client is a minimal HTTP/1.1 keep-alive client on asyncio streams (not a
full HTTP library) so that, on loopback, it costs the shared CPU as little as
possible; the server runs in its own process.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from machine import cpu_model, machine_name  # noqa: E402


def build_gallery(path: str, args) -> None:
    """A random gallery: regions [N, R, D] unit-norm, student embeddings [N, E], saved at ``path``."""
    import torch

    from aladin_fast.retrieval import FeatureStore, Retriever, StudentIndex

    g = torch.Generator().manual_seed(0)
    ids = torch.arange(args.images, dtype=torch.int64)
    student = StudentIndex(args.embed_dim)
    student.add(torch.nn.functional.normalize(torch.randn(args.images, args.embed_dim, generator=g), dim=-1), ids)
    store = FeatureStore(args.dim, args.store_dtype)
    for start in range(0, args.images, 500):  # chunks: never hold the whole gallery in float32 twice
        count = min(500, args.images - start)
        regions = torch.nn.functional.normalize(torch.randn(count, args.regions, args.dim, generator=g), dim=-1)
        store.append(ids[start:start + count], regions)
    store.compact()  # one shard: the kernel reads candidates in place
    Retriever(student, store).save(path)


def make_bodies(args, count: int) -> list:
    """``count`` distinct /search bodies (bytes)."""
    rng = np.random.default_rng(1)
    bodies = []
    for _ in range(count):
        words = rng.standard_normal((args.words, args.dim)).astype(np.float32)
        words /= np.linalg.norm(words, axis=1, keepdims=True)
        embedding = rng.standard_normal(args.embed_dim).astype(np.float32)
        tokens = {"dtype": "float32", "shape": list(words.shape), "data": base64.b64encode(words.tobytes()).decode()}
        bodies.append(json.dumps({"query_embedding": embedding.tolist(), "query_tokens": tokens, "k": args.k,
                                  "rerank_k": args.rerank_k}).encode())
    return bodies


async def http_post(reader, writer, host: str, path: str, body: bytes) -> int:
    """One keep-alive POST; returns the status code (body read and discarded)."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def drive(host: str, port: int, bodies: list, concurrency: int, requests: int, duration: float, warmup: int,
                after_warmup=None):
    """Closed loop: ``concurrency`` connections; returns (latencies [s], elapsed s, errors).

    ``after_warmup()`` (a plain function) runs between the warm-up and the measured phase.
    """
    latencies, errors = [], 0
    counter = {"next": 0}
    connections = [await asyncio.open_connection(host, port) for _ in range(concurrency)]
    for position in range(warmup):
        reader, writer = connections[position % concurrency]
        await http_post(reader, writer, host, "/search", bodies[position % len(bodies)])
    if after_warmup is not None:
        after_warmup()
    started = time.perf_counter()
    deadline = started + duration

    async def worker(reader, writer):
        nonlocal errors
        while counter["next"] < requests and time.perf_counter() < deadline:
            position = counter["next"]
            counter["next"] += 1
            sent = time.perf_counter()
            status = await http_post(reader, writer, host, "/search", bodies[position % len(bodies)])
            latencies.append(time.perf_counter() - sent)
            errors += status != 200

    await asyncio.gather(*(worker(reader, writer) for reader, writer in connections))
    elapsed = time.perf_counter() - started
    for _, writer in connections:
        writer.close()
    return latencies, elapsed, errors


def start_server(path: str, port: int, extra: list) -> subprocess.Popen:
    command = [sys.executable, "-m", "aladin_fast.serving.cli", "--retriever", path, "--port", str(port),
               "--log-level", "warning", "--no-verify", *extra]
    process = subprocess.Popen(command, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}: {' '.join(command)}")
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not come up")


def batch_totals(port: int) -> tuple:
    """``(fused calls, requests in them)`` of the search queue so far, from ``GET /metrics``."""
    from aladin_fast.serving.metrics import parse_exposition

    samples = parse_exposition(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
    return (samples.get('aladin_batch_size_count{queue="search"}', 0.0),
            samples.get('aladin_batch_size_sum{queue="search"}', 0.0))


def run_setting(name: str, extra: list, path: str, bodies: list, args, port: int) -> dict:
    process = start_server(path, port, extra)
    try:
        before = []
        latencies, elapsed, errors = asyncio.run(drive("127.0.0.1", port, bodies, args.concurrency, args.requests,
                                                       args.duration, args.warmup,
                                                       lambda: before.append(batch_totals(port))))
        after = batch_totals(port)
        calls = after[0] - before[0][0]
        batch = (after[1] - before[0][1]) / calls if calls else 0.0
    finally:
        process.terminate()
        process.wait(timeout=60)
    lat_ms = np.asarray(latencies) * 1e3
    row = {"setting": name, "server_args": extra, "requests": len(latencies), "errors": int(errors),
           "elapsed_s": round(elapsed, 3), "throughput_rps": round(len(latencies) / elapsed, 2),
           "p50_ms": round(float(np.percentile(lat_ms, 50)), 2), "p90_ms": round(float(np.percentile(lat_ms, 90)), 2),
           "p99_ms": round(float(np.percentile(lat_ms, 99)), 2), "mean_batch_size": round(batch, 2)}
    print(f"{name:<10} {row['requests']:5d} req in {elapsed:6.1f} s  {row['throughput_rps']:8.1f} req/s  "
          f"p50 {row['p50_ms']:8.1f} ms  p90 {row['p90_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  "
          f"mean batch {batch:5.1f}  errors {errors}", flush=True)
    return row


def library_ceiling(path: str, args, batch: int) -> dict:
    """In-process :meth:`Retriever.search` queries/s at batch 1 vs ``batch`` (no HTTP): how much one fused
    call over many queries can gain on this machine at all, the upper bound for server-side batching."""
    import torch

    from aladin_fast.retrieval import Retriever

    retriever = Retriever.load(path, verify=False)
    g = torch.Generator().manual_seed(2)
    count = 2 * batch
    words = torch.nn.functional.normalize(torch.randn(count, args.words, args.dim, generator=g), dim=-1)
    embeddings = torch.nn.functional.normalize(torch.randn(count, args.embed_dim, generator=g), dim=-1)
    retriever.search(embeddings, words, k=args.k, rerank_k=args.rerank_k)  # warm: page in every candidate
    out = {}
    for size in (1, batch):
        best = float("inf")
        for _ in range(2):  # best of two: the machine is shared
            started = time.perf_counter()
            for start in range(0, count, size):
                retriever.search(embeddings[start:start + size], words[start:start + size], k=args.k,
                                 rerank_k=args.rerank_k)
            best = min(best, time.perf_counter() - started)
        out[f"batch_{size}_qps"] = round(count / best, 2)
    out["speedup"] = round(out[f"batch_{batch}_qps"] / out["batch_1_qps"], 2)
    print(f"library    Retriever.search in-process: {out['batch_1_qps']} q/s at batch 1, "
          f"{out[f'batch_{batch}_qps']} q/s at batch {batch} ({out['speedup']}x)", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--store-dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--words", type=int, default=12, help="words per query caption")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rerank-k", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32, help="client connections (closed loop)")
    parser.add_argument("--requests", type=int, default=600, help="measured requests per setting (upper bound)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per setting (upper bound)")
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--gallery", default=None, help="reuse / keep the gallery directory here")
    parser.add_argument("--quick", action="store_true", help="500 images, D=256, 200 requests: a smoke run")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.dim, args.requests, args.duration = 500, 256, 200, 20.0
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        path = args.gallery or os.path.join(scratch, "gallery")
        if not os.path.exists(os.path.join(path, "manifest.json")):
            started = time.time()
            build_gallery(path, args)
            print(f"built gallery {args.images}x{args.regions}x{args.dim} {args.store_dtype} in "
                  f"{time.time() - started:.1f} s at {path}", flush=True)
        bodies = make_bodies(args, 64)
        settings = [("batched", ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms)]),
                    ("unbatched", ["--max-batch-size", "1"])]
        rows = [run_setting(name, extra, path, bodies, args, args.port) for name, extra in settings]
        ceiling = library_ceiling(path, args, args.max_batch_size)
    batched, unbatched = rows
    summary = {"throughput_speedup": round(batched["throughput_rps"] / unbatched["throughput_rps"], 2),
               "p50_ratio_batched_over_unbatched": round(batched["p50_ms"] / unbatched["p50_ms"], 2),
               "goal": ">= 3x throughput at <= 2x p50 latency"}
    print(f"batching: {summary['throughput_speedup']}x throughput, p50 ratio {summary['p50_ratio_batched_over_unbatched']}")
    result = {
        "benchmark": "load_test_serving",
        "machine": {"name": machine_name(), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()},
        "workload": {"images": args.images, "regions": args.regions, "dim": args.dim, "embed_dim": args.embed_dim,
                     "store_dtype": args.store_dtype, "words": args.words, "k": args.k, "rerank_k": args.rerank_k,
                     "concurrency": args.concurrency, "requests_per_setting": args.requests,
                     "max_duration_s": args.duration, "query_encoding": "base64 float32"},
        "rows": rows, "summary": summary, "library_ceiling": ceiling, "note": args.note,
        "command": "python benchmarks/load_test_serving.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "datetime": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, f"serving-{machine_name()}.json")
    with open(out + ".tmp", "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
