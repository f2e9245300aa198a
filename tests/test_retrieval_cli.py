"""`python -m aladin_fast index` / `search` on .npy files agree with the library."""
import json
import subprocess
import sys

import numpy as np
import torch

from aladin_fast.retrieval import Retriever


def test_index_then_search_matches_library(tmp_path):
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((40, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    tokens = rng.standard_normal((40, 7, 24)).astype(np.float32)
    lengths = rng.integers(1, 8, 40)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    query_tokens = rng.standard_normal((3, 5, 24)).astype(np.float32)
    for name, array in dict(e=embeddings, t=tokens, l=lengths, q=queries, qt=query_tokens).items():
        np.save(tmp_path / f"{name}.npy", array)
    out = tmp_path / "gallery"
    run = lambda *args: subprocess.run([sys.executable, "-m", "aladin_fast", *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    built = run("index", "--embeddings", str(tmp_path / "e.npy"), "--tokens", str(tmp_path / "t.npy"),
                "--lengths", str(tmp_path / "l.npy"), "--out", str(out))
    assert built.returncode == 0, built.stderr
    searched = run("search", "--retriever", str(out), "--query-embeddings", str(tmp_path / "q.npy"),
                   "--query-tokens", str(tmp_path / "qt.npy"), "--k", "4", "--rerank-k", "12")
    assert searched.returncode == 0, searched.stderr
    result = json.loads(searched.stdout)
    ids, scores = Retriever.load(str(out)).search(torch.from_numpy(queries), torch.from_numpy(query_tokens), k=4,
                                                  rerank_k=12)
    assert result["ids"] == ids.tolist()
    np.testing.assert_allclose(result["scores"], scores.numpy(), rtol=0, atol=0)
    bad = run("index", "--embeddings", str(tmp_path / "e.npy"), "--tokens", str(tmp_path / "qt.npy"), "--out",
              str(tmp_path / "x"))
    assert bad.returncode != 0 and "--tokens has 3 items but --embeddings has 40" in bad.stderr
