"""Fidelity to the public precomputed-feature formats (SCAN / VSE++ / TERAN) and to SCAN's evaluation protocol.

Files are generated here in the exact on-disk layouts of the public releases (no dataset is downloaded):
SCAN ``{split}_ims.npy`` ``[N, 36, 2048]`` + ``{split}_caps.txt`` (5 consecutive captions per image), its
``im_div`` rule, VSE++ global features, per-image bottom-up features with variable region counts, float16
features, caption files with a BOM / CRLF / no final newline. The ranking protocol is compared with an
independent re-implementation of SCAN's ``i2t`` / ``t2i`` (``evaluation.py``: ``np.argsort(...)[::-1]``).
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from aladin_fast.data import PrecompCollator, PrecompDataset, save_precomp
from aladin_fast.eval import coco_1k, folds_metrics, retrieval_metrics, retrieval_ranks
from aladin_fast.evaluate import RetrievalEvaluator
from aladin_fast.training.data import as_source


def _captions(count):
    return [f"caption {j} of image {j // 5}" for j in range(count)]


def _write_caps(path, lines, newline="\n", final=True, bom=False):
    text = newline.join(lines) + (newline if final else "")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


# ------------------------------------------------------------------ SCAN precomp layout
@pytest.mark.parametrize("split", ["train", "dev", "test", "testall"])
def test_scan_precomp_layout_exact(tmp_path, split):
    """``{split}_ims.npy`` [N, 36, 2048] float32, 5 consecutive captions per image: caption j <-> image j // 5."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 36, 2048)).astype(np.float32)
    np.save(tmp_path / f"{split}_ims.npy", images)
    _write_caps(tmp_path / f"{split}_caps.txt", _captions(20))
    dataset = PrecompDataset(tmp_path, split)
    assert (dataset.layout, dataset.num_images, len(dataset), dataset.feature_dim) == ("scan", 4, 20, 2048)
    assert dataset.image_lengths.tolist() == [36] * 4
    assert isinstance(dataset._images, np.memmap)
    for j in (0, 4, 5, 19):
        item = dataset[j]
        assert item.image_index == j // 5 and item.caption == f"caption {j} of image {j // 5}"
        np.testing.assert_array_equal(item.image, images[j // 5])
    regions, lengths = as_source(dataset).image_batch([3, 0])
    np.testing.assert_array_equal(regions.numpy(), images[[3, 0]])
    assert lengths.tolist() == [36, 36]


def test_scan_im_div_one_image_row_per_caption(tmp_path):
    """SCAN's im_div rule: ``images.shape[0] == len(captions)`` means one (repeated) row per caption. SCAN pairs
    caption j with row j and evaluates image i as row 5 i (``img_embs[::5]``). It was refused ("15 captions for
    15 images; expected 75")."""
    rng = np.random.default_rng(1)
    rows = np.repeat(rng.standard_normal((3, 4, 8)).astype(np.float32), 5, axis=0)  # 15 rows, 5 copies each
    rows[7] += 1.0  # a row that differs inside its group: the item still reads its own row (im_div = 1)
    np.save(tmp_path / "test_ims.npy", rows)
    _write_caps(tmp_path / "test_caps.txt", _captions(15))
    with pytest.warns(UserWarning, match="one row per caption .*captions_per_image=1"):  # never silent
        dataset = PrecompDataset(tmp_path, "test")
    assert dataset.num_images == 3 and len(dataset) == 15 and dataset.image_lengths.tolist() == [4, 4, 4]
    # a split that really has one caption per image says so, and reads every row
    single = PrecompDataset(tmp_path, "test", captions_per_image=1)
    assert single.num_images == 15 and len(single) == 15
    for i in range(3):
        np.testing.assert_array_equal(dataset.image(i), rows[5 * i])
    for j in range(15):
        item = dataset[j]
        assert item.image_index == j // 5 and item.caption == _captions(15)[j]
        np.testing.assert_array_equal(item.image, rows[j])
    np.testing.assert_array_equal(as_source(dataset).image_batch([2])[0].numpy(), rows[[10]])
    # im_div = 5 (one row per image) is unchanged
    np.save(tmp_path / "dev_ims.npy", rows[::5])
    _write_caps(tmp_path / "dev_caps.txt", _captions(15))
    np.testing.assert_array_equal(PrecompDataset(tmp_path, "dev")[7].image, rows[5])


def test_vsepp_global_features_refused_with_a_clear_message(tmp_path):
    """VSE++ precomp ``{split}_ims.npy`` holds one global vector per image ``[N, D]``."""
    features = np.random.default_rng(2).standard_normal((3, 2048)).astype(np.float32)
    np.save(tmp_path / "test_ims.npy", features)
    _write_caps(tmp_path / "test_caps.txt", _captions(15))
    with pytest.raises(ValueError, match=r"test_ims\.npy must be \[N_images, R, D\], got shape \(3, 2048\): one "
                                         r"global vector per image \(VSE\+\+ precomp\).*\[N, 1, D\]"):
        PrecompDataset(tmp_path, "test")
    np.save(tmp_path / "test_ims.npy", features[:, None])  # the suggested conversion: one region per image
    dataset = PrecompDataset(tmp_path, "test")
    assert dataset.image_lengths.tolist() == [1, 1, 1]
    np.testing.assert_array_equal(dataset[14].image, features[2:3])


# ------------------------------------------------------------------ per-image bottom-up features
def test_per_image_variable_regions_use_lengths_not_padding(tmp_path):
    """Bottom-up features with 10-100 regions per image (one [R_i, 2048] .npy each, float16 on disk): lengths
    are exact, values exact, and padding is zeros past each length."""
    rng = np.random.default_rng(3)
    counts = [10, 100, 37, 64]
    (tmp_path / "test_ims").mkdir()
    per_image = []
    for i, count in enumerate(counts):
        features = (rng.standard_normal((count, 2048)) + 5).astype(np.float16)  # no zero can hide padding
        np.save(tmp_path / "test_ims" / f"{i}.npy", features)
        per_image.append(features)
    _write_caps(tmp_path / "test_caps.txt", _captions(20))
    dataset = PrecompDataset(tmp_path, "test")
    assert dataset.image_lengths.tolist() == counts and dataset.feature_dim == 2048
    batch = PrecompCollator()([dataset[j] for j in (0, 5, 10, 15)])
    assert batch.images.dtype == torch.float32 and batch.images.shape == (4, 100, 2048)
    assert batch.image_lengths.tolist() == counts
    for row, features in enumerate(per_image):
        np.testing.assert_array_equal(batch.images[row, :counts[row]].numpy(), features.astype(np.float32))
        assert not batch.images[row, counts[row]:].any()
    regions, lengths = as_source(dataset).image_batch([0, 1])
    assert lengths.tolist() == [10, 100] and not regions[0, 10:].any()


def test_teran_npz_folder_gets_a_clear_message(tmp_path):
    """TERAN's release stores ``bu_att/{image_id}.npz`` (key "feat"): not read, and the message says so."""
    (tmp_path / "test_ims").mkdir()
    np.savez(tmp_path / "test_ims" / "391895.npz", feat=np.zeros((36, 8), np.float32))
    _write_caps(tmp_path / "test_caps.txt", _captions(5))
    with pytest.raises(FileNotFoundError, match=r"holds no \.npy files \(it holds \.npz archives, e\.g\. TERAN"):
        PrecompDataset(tmp_path, "test")


def test_float16_array_on_disk_is_memory_mapped_and_read_exactly(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.standard_normal((50, 36, 64)).astype(np.float16)
    np.save(tmp_path / "train_ims.npy", images)
    _write_caps(tmp_path / "train_caps.txt", _captions(250))
    dataset = PrecompDataset(tmp_path, "train")
    assert isinstance(dataset._images, np.memmap) and dataset._images.dtype == np.float16
    assert isinstance(dataset.image(49), np.memmap)  # a view of the mapped file, not a copy
    batch = PrecompCollator()([dataset[j] for j in (0, 249)])
    np.testing.assert_array_equal(batch.images.numpy(), images[[0, 49]].astype(np.float32))


# ------------------------------------------------------------------ caption files
def test_caption_file_with_bom_crlf_and_no_final_newline(tmp_path):
    """A BOM was kept as the first caption's first character ("\\ufeffcaption 0 ...")."""
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 3, 4), np.float32))
    captions = _captions(10)
    _write_caps(tmp_path / "test_caps.txt", captions, newline="\r\n", final=False, bom=True)
    assert PrecompDataset(tmp_path, "test").captions == captions
    _write_caps(tmp_path / "test_caps.txt", captions, newline="\r\n", final=True, bom=True)
    assert PrecompDataset(tmp_path, "test").captions == captions
    # save_precomp writes no BOM, and a caption that starts with U+FEFF survives the round trip
    odd = ["\ufeffstarts with a BOM"] + captions[1:]
    save_precomp(tmp_path / "w", "test", np.zeros((2, 3, 4), np.float32), captions)
    assert not (tmp_path / "w" / "test_caps.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    save_precomp(tmp_path / "w", "test", np.zeros((2, 3, 4), np.float32), odd)
    assert PrecompDataset(tmp_path / "w", "test").captions == odd


def test_caption_count_errors_name_both_files_and_counts(tmp_path):
    np.save(tmp_path / "test_ims.npy", np.zeros((2, 3, 4), np.float32))
    _write_caps(tmp_path / "test_caps.txt", _captions(10) + [""])  # a trailing empty line
    with pytest.raises(ValueError, match=r"test_caps\.txt has 11 captions for 2 images; expected captions_per_image "
                                         r"\* N_images = 5 \* 2 = 10 \(the file ends with 1 empty line\(s\)\) "
                                         r"\(images: .*test_ims\.npy\)"):
        PrecompDataset(tmp_path, "test")
    _write_caps(tmp_path / "test_caps.txt", _captions(7))  # not a multiple of 5
    with pytest.raises(ValueError, match=r"has 7 captions for 2 images; expected .* = 10 \(images: .*test_ims\.npy\)"):
        PrecompDataset(tmp_path, "test")
    (tmp_path / "dev_ims").mkdir()
    np.save(tmp_path / "dev_ims" / "0.npy", np.zeros((3, 4), np.float32))
    _write_caps(tmp_path / "dev_caps.txt", _captions(6))
    with pytest.raises(ValueError, match=r"has 6 captions for 1 images; .* = 5 \(images: .*dev_ims/\)"):
        PrecompDataset(tmp_path, "dev")


# ------------------------------------------------------------------ the evaluation protocol vs SCAN's code
def _scan_i2t(sims):
    """SCAN evaluation.py ``i2t``: 0-based rank = best position of the 5 GT captions in argsort(...)[::-1]."""
    npts = sims.shape[0]
    ranks = np.zeros(npts)
    for index in range(npts):
        inds = np.argsort(sims[index])[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in range(5 * index, 5 * index + 5))
    return ranks


def _scan_t2i(sims):
    npts = sims.shape[0]
    ranks = np.zeros(5 * npts)
    sims = sims.T
    for index in range(npts):
        for i in range(5):
            inds = np.argsort(sims[5 * index + i])[::-1]
            ranks[5 * index + i] = np.where(inds == index)[0][0]
    return ranks


def _scan_metrics(sims):
    out = {}
    for prefix, ranks in (("i2t", _scan_i2t(sims)), ("t2i", _scan_t2i(sims))):
        for level in (1, 5, 10):
            out[f"{prefix}_r{level}"] = 100.0 * len(np.where(ranks < level)[0]) / len(ranks)
        out[f"{prefix}_medr"] = np.floor(np.median(ranks)) + 1
        out[f"{prefix}_meanr"] = ranks.mean() + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def _assert_metrics_equal(ours, scan):
    for name, value in scan.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name


def test_ranks_match_scan_without_ties():
    rng = np.random.default_rng(5)
    for images in (7, 60):
        truth = np.repeat(np.eye(images), 5, axis=1)
        sims = rng.standard_normal((images, 5 * images)) + 1.5 * truth  # continuous: no ties
        _assert_metrics_equal(retrieval_metrics(sims), _scan_metrics(sims))
        i2t, t2i = retrieval_ranks(sims)
        np.testing.assert_array_equal(i2t.numpy(), _scan_i2t(sims) + 1)
        np.testing.assert_array_equal(t2i.numpy(), _scan_t2i(sims) + 1)


def test_coco_1k_is_scans_five_fold_loop():
    """SCAN's ``fold5``: fold i = images [1000 i, 1000 (i+1)) and captions [5000 i, 5000 (i+1)); the mean of
    each metric over folds (rsum = mean of per-fold rsums). Two folds here (2,000 images) to stay small."""
    rng = np.random.default_rng(6)
    images = 2000
    sims = rng.standard_normal((images, 5 * images)).astype(np.float32)
    for i in range(images):  # make it easy enough that recalls are not all zero
        sims[i, 5 * i:5 * i + 5] += rng.uniform(2.0, 4.0)
    folds = [_scan_metrics(sims[f * 1000:(f + 1) * 1000, f * 5000:(f + 1) * 5000].astype(np.float64))
             for f in range(2)]
    expected = {name: float(np.mean([fold[name] for fold in folds])) for name in folds[0]}
    _assert_metrics_equal(coco_1k(sims), expected)
    _assert_metrics_equal(folds_metrics(sims, 1000), expected)
    whole = retrieval_metrics(sims)  # COCO 5K: all images compete, so recalls are lower
    assert whole["i2t_r1"] < expected["i2t_r1"] and whole["t2i_r1"] < expected["t2i_r1"]
    # the evaluate command reports both on a k * 1000-image split (it reported the whole-split numbers only)
    evaluator = types.SimpleNamespace(split=types.SimpleNamespace(captions_per_image=5, num_images=images),
                                      _ranks_result=RetrievalEvaluator._ranks_result)
    scores = torch.from_numpy(sims)
    result = RetrievalEvaluator._result(evaluator, scores, scores, {})
    _assert_metrics_equal(result["metrics"], whole)
    _assert_metrics_equal(result["metrics_1k"], expected)
    evaluator.split.num_images = 1000
    small = sims[:1000, :5000]
    assert "metrics_1k" not in RetrievalEvaluator._result(evaluator, small, small, {})


def test_ties_are_pessimistic_not_argsort_order():
    """Pinned: a competitor tied with the ground truth ranks above it. SCAN's argsort order puts tied
    higher indices first, so on tied scores our ranks are never better than SCAN's (equal without ties)."""
    images = 12  # > 10: every rank misses R@10
    constant = np.zeros((images, 5 * images))
    i2t, t2i = retrieval_ranks(constant)
    assert i2t.tolist() == [5 * images - 5 + 1] * images  # every other image's caption ties above
    assert t2i.tolist() == [images] * (5 * images)
    assert retrieval_metrics(constant)["rsum"] == 0.0
    scan_i2t, scan_t2i = _scan_i2t(constant) + 1, _scan_t2i(constant) + 1
    assert (scan_i2t < i2t.numpy()).any() and (scan_t2i <= t2i.numpy()).all()  # SCAN would be lucky here
    # quantised scores: many ties, ours = 1 + #(others >= ground truth)
    rng = np.random.default_rng(7)
    sims = np.round(rng.standard_normal((20, 100)), 0)
    i2t, t2i = retrieval_ranks(sims)
    for j in range(100):
        truth = sims[j // 5, j]
        assert t2i[j] == 1 + int((np.delete(sims[:, j], j // 5) >= truth).sum())
    for i in range(20):
        best = sims[i, 5 * i:5 * i + 5].max()
        others = np.delete(sims[i], range(5 * i, 5 * i + 5))
        assert i2t[i] == 1 + int((others >= best).sum())
    assert (_scan_i2t(sims) + 1 <= i2t.numpy()).all() and (_scan_t2i(sims) + 1 <= t2i.numpy()).all()
