"""Saving and loading retrievers: bit-exact round trips, corruption detection, crash-safe saves."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from aladin_fast.retrieval import FeatureStore, ManifestError, Retriever, StudentIndex  # noqa: E402
from aladin_fast.retrieval import manifest as manifest_module  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, EMBED = 16, 12


def make_retriever(count=30, seed=0, dtype="float16", first_id=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.nn.functional.normalize(torch.randn(count, 6, DIM, generator=g), dim=-1)
    lengths = torch.randint(1, 7, (count,), generator=g)
    embeddings = torch.nn.functional.normalize(torch.randn(count, EMBED, generator=g), dim=-1)
    ids = torch.arange(first_id, first_id + count) * 2
    index = StudentIndex(EMBED)
    index.add(embeddings, ids)
    store = FeatureStore(DIM, dtype)
    store.append(ids, tokens, lengths)
    return Retriever(index, store, direction="image_to_text")


def probe(retriever, seed=1):
    g = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(4, 5, DIM, generator=g), dim=-1)
    embeddings = torch.nn.functional.normalize(torch.randn(4, EMBED, generator=g), dim=-1)
    return retriever.search(embeddings, queries, None, k=5, rerank_k=12, return_explanations=True)


def payload_file(path, pattern):
    matches = glob.glob(os.path.join(path, "payload-*", pattern))
    assert len(matches) == 1, matches
    return matches[0]


def rewrite_manifest(path, edit):
    """Edit manifest.json and re-sign it, as a newer (or hostile) writer would."""
    with open(os.path.join(path, "manifest.json")) as handle:
        document = json.load(handle)
    edit(document)
    document["manifest_sha256"] = manifest_module._manifest_digest(document)
    with open(os.path.join(path, "manifest.json"), "w") as handle:
        json.dump(document, handle)


def test_round_trip_is_bit_exact_and_manifest_is_complete(tmp_path):
    retriever = make_retriever()
    retriever.feature_store.remove([4])
    retriever.student_index.remove([4])
    path = str(tmp_path / "gallery")
    retriever.save(path)
    loaded = Retriever.load(path)
    assert loaded.direction == "image_to_text" and loaded.count == 29
    assert isinstance(loaded.feature_store._layout.shards[0].tokens, np.memmap)
    for a, b in zip(probe(retriever), probe(loaded)):
        assert torch.equal(a, b)
    ids = loaded.feature_store.ids()
    for a, b in zip(retriever.feature_store.gather(ids), loaded.feature_store.gather(ids)):
        assert torch.equal(a, b)
    with open(os.path.join(path, "manifest.json")) as handle:
        document = json.load(handle)
    assert document["format_version"] == manifest_module.FORMAT_VERSION and document["kind"] == "retriever"
    meta = document["meta"]
    assert (meta["count"], meta["embedding_dim"], meta["token_dim"], meta["metric"], meta["dtype"]) == (
        29, EMBED, DIM, "ip", "float16")
    assert set(document["files"]) == {"retriever.json", "student/config.json", "student/index.faiss",
                                      "features/tokens-00000.npy", "features/offsets-00000.npy", "features/ids-00000.npy"}
    for name, entry in document["files"].items():
        full = os.path.join(path, document["payload"], name)
        assert entry["bytes"] == os.path.getsize(full) and entry["sha256"] == manifest_module.file_sha256(full)
    # saving again (over the loaded, memory-mapped version) replaces it and cleans up the old payload
    loaded.save(path)
    assert len(glob.glob(os.path.join(path, "payload-*"))) == 1
    assert torch.equal(probe(Retriever.load(path))[1], probe(retriever)[1])


def test_bit_flip_is_detected(tmp_path):
    path = str(tmp_path / "gallery")
    make_retriever().save(path)
    target = payload_file(path, "features/tokens-00000.npy")
    with open(target, "r+b") as handle:
        handle.seek(os.path.getsize(target) - 7)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ManifestError, match="tokens-00000.npy.*is corrupt: its SHA-256"):
        Retriever.load(path)


@pytest.mark.parametrize("name", ["features/offsets-00000.npy", "student/index.faiss"])
def test_truncated_file_is_detected_even_without_hashing(tmp_path, name):
    path = str(tmp_path / "gallery")
    make_retriever().save(path)
    target = payload_file(path, name)
    size = os.path.getsize(target)
    with open(target, "r+b") as handle:
        handle.truncate(size - 3)
    with pytest.raises(ManifestError, match=f"truncated or was modified: expected {size} bytes, found {size - 3}"):
        Retriever.load(path, verify=False)


def test_missing_file_newer_version_and_damaged_manifest(tmp_path):
    path = str(tmp_path / "gallery")
    make_retriever().save(path)
    rewrite_manifest(path, lambda d: d.update(format_version=manifest_module.FORMAT_VERSION + 1))
    with pytest.raises(ManifestError, match="newer than this aladin-fast"):
        Retriever.load(path)
    make_retriever().save(path)
    with open(os.path.join(path, "manifest.json"), "r+") as handle:  # an edit that keeps valid JSON
        text = handle.read().replace('"count": 30', '"count": 31', 1)
        handle.seek(0)
        handle.write(text)
    with pytest.raises(ManifestError, match="its own checksum"):
        Retriever.load(path)
    with open(os.path.join(path, "manifest.json"), "w") as handle:
        handle.write('{"format": "aladin-fast-retr')
    with pytest.raises(ManifestError, match="not valid JSON"):
        Retriever.load(path)
    make_retriever().save(path)
    os.remove(payload_file(path, "features/ids-00000.npy"))
    with pytest.raises(ManifestError, match="ids-00000.npy listed in the manifest is missing"):
        Retriever.load(path)
    with pytest.raises(ManifestError, match="no manifest.json"):
        Retriever.load(str(tmp_path))


def test_shape_and_count_mismatches_are_detected(tmp_path):
    path = str(tmp_path / "gallery")
    make_retriever().save(path)
    rewrite_manifest(path, lambda d: d["meta"]["feature_store"]["shards"][0].update(items=29))
    with pytest.raises(ManifestError, match="shard 0 .* does not match the manifest"):
        Retriever.load(path)
    make_retriever().save(path)
    rewrite_manifest(path, lambda d: d["meta"].update(count=31))
    with pytest.raises(ManifestError, match="manifest count 31"):
        Retriever.load(path)
    make_retriever().save(path)
    rewrite_manifest(path, lambda d: d["meta"]["student_index"].update(dim=EMBED + 1))
    with pytest.raises(ManifestError, match="manifest says dim=13 but the files hold 12"):
        Retriever.load(path)
    with pytest.raises(ManifestError, match="holds a saved 'retriever', not a 'student_index'"):
        StudentIndex.load(path)


def test_exception_mid_save_leaves_previous_version(tmp_path, monkeypatch):
    path = str(tmp_path / "gallery")
    old = make_retriever()
    old.save(path)
    expected = probe(old)
    new = make_retriever(count=40, seed=3)
    calls = []
    real_save = np.save

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the first shard file is on disk
            raise OSError("disk full (injected)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        new.save(path)
    monkeypatch.setattr(np, "save", real_save)
    loaded = Retriever.load(path)
    assert loaded.count == 30 and all(torch.equal(a, b) for a, b in zip(probe(loaded), expected))
    assert not glob.glob(os.path.join(path, ".tmp-*")) and len(glob.glob(os.path.join(path, "payload-*"))) == 1
    new.save(path)
    assert Retriever.load(path).count == 40


def test_killed_save_leaves_previous_version(tmp_path):
    path = str(tmp_path / "gallery")
    old = make_retriever()
    old.save(path)
    expected = probe(old)
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_retrieval_persistence import make_retriever
        real_save = np.save
        def slow_save(*args, **kwargs):
            real_save(*args, **kwargs)
            print("WRITING", flush=True)  # one payload file is on disk: the parent kills us now
            time.sleep(120)
        retriever = make_retriever(count=50, seed=9)
        np.save = slow_save
        retriever.save({path!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "WRITING", child.stderr.read()
        assert glob.glob(os.path.join(path, ".tmp-*"))  # a half-written version exists
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    loaded = Retriever.load(path)
    assert loaded.count == 30 and all(torch.equal(a, b) for a, b in zip(probe(loaded), expected))
    make_retriever(count=20).save(path)  # the next save removes the dead save's leftovers
    assert not glob.glob(os.path.join(path, ".tmp-*")) and Retriever.load(path).count == 20


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ManifestError, match="refusing to save"):
        make_retriever().save(str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_standalone_store_and_index_directories(tmp_path):
    retriever = make_retriever(dtype="bfloat16")
    retriever.feature_store.save(str(tmp_path / "store"), items_per_shard=7)
    retriever.student_index.save(str(tmp_path / "index"))
    store = FeatureStore.load(str(tmp_path / "store"))
    index = StudentIndex.load(str(tmp_path / "index"), device="cpu")
    rebuilt = Retriever(index, store, direction="image_to_text")
    assert store.num_shards == 5 and store.dtype == torch.bfloat16
    for a, b in zip(probe(retriever), probe(rebuilt)):
        assert torch.equal(a, b)
    with pytest.raises(ManifestError, match="not a 'feature_store'"):
        FeatureStore.load(str(tmp_path / "index"))
