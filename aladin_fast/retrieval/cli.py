"""``python -m aladin_fast index`` and ``python -m aladin_fast search``: retrievers from feature files.

index: build a saved Retriever directory from ``.npy`` files of gallery student
embeddings ``[N, E]`` and fine-grained tokens ``[N, L, D]`` (regions per image
for text->image, words per caption for image->text), optional lengths ``[N]``
and ids ``[N]``.

search: load a retriever directory and run two-stage search for query files
(student embeddings ``[Nq, E]`` + tokens ``[Nq, L, D]`` + optional lengths);
writes ids and scores as JSON (stdout or ``--out``).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from .._io import write_text_atomic
from ..cli import program
from .._inputs import AGGREGATIONS


def _load_array(name: str, path: Optional[str], ndim: int, dtype_kind: str):
    if path is None:
        return None
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise SystemExit(f"--{name}: cannot read {path!r} as .npy ({err})")
    if not isinstance(array, np.ndarray):  # np.load opens a .npz archive as an NpzFile
        array.close()
        raise SystemExit(f"--{name}: {path!r} is a .npz archive, not a .npy array")
    if array.ndim != ndim:
        raise SystemExit(f"--{name}: expected a {ndim}-D array, got shape {list(array.shape)} in {path!r}")
    if dtype_kind == "f" and array.dtype.kind != "f":
        raise SystemExit(f"--{name}: expected floating values, got dtype {array.dtype} in {path!r}")
    if dtype_kind == "i" and array.dtype.kind not in "iu":
        raise SystemExit(f"--{name}: expected integer values, got dtype {array.dtype} in {path!r}")
    return array


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embeddings", required=True, help=".npy [N, E] gallery student embeddings")
    parser.add_argument("--tokens", required=True, help=".npy [N, L, D] gallery tokens (padded)")
    parser.add_argument("--lengths", help=".npy [N] valid tokens per item (default: all L)")
    parser.add_argument("--ids", help=".npy [N] int64 ids (default: 0..N-1)")
    parser.add_argument("--index", default="flat", help="flat | ivf | hnsw | ivfpq | a faiss factory string")
    parser.add_argument("--metric", default="ip", choices=["ip", "cosine", "l2"])
    parser.add_argument("--store-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--direction", default="text_to_image", choices=["text_to_image", "image_to_text"])
    parser.add_argument("--aggregation", default="MrSw", choices=AGGREGATIONS)
    parser.add_argument("--padding", default="neg_inf", choices=["neg_inf", "zero"])
    parser.add_argument("--out", required=True, help="retriever directory to write (atomically)")


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retriever", required=True, help="directory written by `index` or Retriever.save")
    parser.add_argument("--query-embeddings", required=True, help=".npy [Nq, E] query student embeddings")
    parser.add_argument("--query-tokens", required=True, help=".npy [Nq, L, D] query tokens (padded)")
    parser.add_argument("--query-lengths", help=".npy [Nq] valid tokens per query")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rerank-k", type=int, default=100)
    parser.add_argument("--explain", action="store_true", help="include the winning region per word of every hit")
    parser.add_argument("--out", help="write JSON here instead of stdout")


def _usage_errors(command: str):
    """Turn the library's ValueError / OSError (bad shapes, lengths, ids, k, paths) into a message and exit 1."""
    def decorate(run):
        @functools.wraps(run)
        def wrapper(args: argparse.Namespace) -> int:
            try:
                return run(args)
            except (ValueError, OSError) as err:  # ManifestError is a ValueError
                raise SystemExit(f"aladin_fast {command}: {err}") from None
        return wrapper
    return decorate


@_usage_errors("index")
def run_index(args: argparse.Namespace) -> int:
    from . import FeatureStore, Retriever, StudentIndex, TeacherScorer

    embeddings = _load_array("embeddings", args.embeddings, 2, "f")
    tokens = _load_array("tokens", args.tokens, 3, "f")
    lengths = _load_array("lengths", args.lengths, 1, "i")
    ids = _load_array("ids", args.ids, 1, "i")
    count = embeddings.shape[0]
    if tokens.shape[0] != count:
        raise SystemExit(f"--tokens has {tokens.shape[0]} items but --embeddings has {count}; they must match")
    ids = np.arange(count, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    start = time.perf_counter()
    index = StudentIndex(embeddings.shape[1], index=args.index, metric=args.metric)
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32), ids)
    store = FeatureStore(tokens.shape[2], dtype=args.store_dtype)
    # numpy straight in (append copies): torch.from_numpy warned on the read-only arrays np.load may return
    store.append(ids, np.ascontiguousarray(tokens, dtype=np.float32),
                 None if lengths is None else np.asarray(lengths, dtype=np.int64))
    scorer = TeacherScorer(aggregation=args.aggregation, padding=args.padding)
    retriever = Retriever(index, store, scorer, direction=args.direction)
    retriever.save(args.out)
    print(f"indexed {count} items ({args.direction}, index={args.index}, store {args.store_dtype}) "
          f"into {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


@_usage_errors("search")
def run_search(args: argparse.Namespace) -> int:
    from . import Retriever

    retriever = Retriever.load(args.retriever)
    embeddings = _load_array("query-embeddings", args.query_embeddings, 2, "f")
    tokens = _load_array("query-tokens", args.query_tokens, 3, "f")
    lengths = _load_array("query-lengths", args.query_lengths, 1, "i")
    # np.array copies: np.load's memory maps are read-only, and torch.from_numpy of a read-only array printed
    # a UserWarning on every search (the queries are small; index avoids the copy by passing numpy on)
    query_embeddings = torch.from_numpy(np.array(embeddings, dtype=np.float32))
    query_tokens = torch.from_numpy(np.array(tokens, dtype=np.float32))
    query_lengths = None if lengths is None else torch.from_numpy(np.array(lengths, dtype=np.int64))
    start = time.perf_counter()
    result = retriever.search(query_embeddings, query_tokens, query_lengths, k=args.k, rerank_k=args.rerank_k,
                              return_explanations=args.explain)
    elapsed = time.perf_counter() - start
    ids, scores = result[0], result[1]
    # strict JSON: an empty slot (id -1, score -inf) and a NaN score are written as null
    payload = {"ids": ids.tolist(), "scores": [[float(v) if math.isfinite(v) else None for v in row]
                                               for row in scores.tolist()],
               "seconds": elapsed, "queries": int(ids.shape[0])}
    if args.explain:
        payload["explanations"] = result[2].tolist()
    text = json.dumps(payload, allow_nan=False)
    if args.out:
        write_text_atomic(args.out, text)
    else:
        sys.stdout.write(text + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=program(), description="build and query retriever directories")
    commands = parser.add_subparsers(dest="command", required=True)
    add_index_arguments(commands.add_parser("index", help="build a retriever directory from .npy features"))
    add_search_arguments(commands.add_parser("search", help="two-stage search with a saved retriever"))
    args = parser.parse_args(argv)
    return run_index(args) if args.command == "index" else run_search(args)
