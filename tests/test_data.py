"""Data: synthetic scenes (determinism, ground truth, hard negatives, fine-grained signal),
the precomputed-feature loaders (both layouts, errors) and the vocabulary."""
from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aladin_fast
from aladin_fast.data import (
    PrecompCollator,
    PrecompDataset,
    SyntheticScenes,
    Tokenizer,
    Vocabulary,
    pad_features,
    save_precomp,
    tokenize,
)
from aladin_fast.data.synthetic import ATTRIBUTES, OBJECTS
from aladin_fast.eval import retrieval_metrics

WORD_CONCEPT = {
    word: (kind, concept)
    for kind, table in (("noun", OBJECTS), *ATTRIBUTES.items())
    for concept, words in table.items()
    for word in words
}


@pytest.fixture(scope="module")
def scenes():
    return SyntheticScenes(200, seed=3, feature_dim=256)


# ------------------------------------------------------------------ synthetic
def test_deterministic_per_seed():
    a, b = SyntheticScenes(24, seed=7, feature_dim=64), SyntheticScenes(24, seed=7, feature_dim=64)
    assert a.captions == b.captions and a.scenes == b.scenes
    np.testing.assert_array_equal(a.image_features, b.image_features)
    c = SyntheticScenes(24, seed=8, feature_dim=64)
    assert a.captions != c.captions
    assert not np.array_equal(a.image_features, c.image_features)
    # an image's features do not depend on which subset they are built in
    np.testing.assert_array_equal(a.region_features([5, 2]), a.image_features[[5, 2]])
    # the world (prototypes) is shared across seeds, so train and test splits agree
    np.testing.assert_array_equal(a.concept_prototypes, c.concept_prototypes)
    words_a, lengths_a = a.word_features([0, 3])
    words_b, lengths_b = b.word_features([0, 3])
    assert torch.equal(words_a, words_b) and torch.equal(lengths_a, lengths_b)


def test_shapes_lengths_and_padding(scenes):
    n = len(scenes)
    features = scenes.image_features
    assert features.shape == (n, 36, 256) and features.dtype == np.float32
    assert scenes.image_lengths.shape == (n,) and scenes.image_lengths.dtype == np.int64
    assert scenes.image_lengths.min() >= scenes.min_regions and scenes.image_lengths.max() <= 36
    assert len(set(scenes.image_lengths.tolist())) > 5  # variable region counts
    for i in range(n):
        assert not features[i, scenes.image_lengths[i]:].any()  # zero padding
        assert np.abs(features[i, : scenes.image_lengths[i]]).sum(axis=1).min() > 0
    assert len(scenes.captions) == 5 * n and len(scenes.caption_objects) == 5 * n
    assert scenes.groups.tolist() == [i // 4 for i in range(n)]
    words, lengths = scenes.word_features(range(10))
    assert words.shape[:2] == (10, int(lengths.max())) and words.shape[2] == 256 and words.dtype == torch.float32
    assert lengths.tolist() == [len(tokenize(c)) for c in scenes.captions[:10]]


def test_scene_ground_truth_is_consistent(scenes):
    for scene in scenes.scenes:
        assert 3 <= len(scene.objects) <= 6
        assert len({o.noun for o in scene.objects}) == len(scene.objects)
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        assert scene.num_regions == sum(scene.object_regions) + len(scene.background)
        for subject, relation, obj in scene.relations:
            (sr, sc), (orow, oc) = scene.objects[subject].cell, scene.objects[obj].cell
            expected = {"left of": sc < oc, "right of": sc > oc, "above": sc == oc and sr < orow,
                        "below": sc == oc and sr > orow}[relation]
            assert expected, (scene, relation)


def test_captions_mention_real_scene_objects(scenes):
    vocabulary_words = set()
    for j, caption in enumerate(scenes.captions):
        scene = scenes.scenes[j // 5]
        mentioned = [scene.objects[k] for k in scenes.caption_objects[j]]
        assert mentioned
        words = tokenize(caption)
        vocabulary_words.update(words)
        content = [WORD_CONCEPT[w] for w in words if w in WORD_CONCEPT]
        nouns = [concept for kind, concept in content if kind == "noun"]
        assert sorted(nouns) == sorted(o.noun for o in mentioned), caption
        for kind, concept in content:
            if kind != "noun":  # every attribute word is true of a mentioned object
                assert concept in {getattr(o, kind) for o in mentioned}, (caption, kind, concept)
    synonyms = {w for w in vocabulary_words if w in WORD_CONCEPT and WORD_CONCEPT[w][1] != w}
    assert len(synonyms) > 5  # synonyms are used, not only the canonical names
    assert len({c.split()[0] for c in scenes.captions}) >= 4  # varied sentence openings


def test_hard_negative_pairs_differ_in_exactly_one_thing(scenes):
    pairs = scenes.hard_negative_pairs()
    assert len(pairs) == 150  # 50 groups of 4: one base and three variants each
    mentions = 0
    for base, variant, change in pairs:
        a, b = scenes.scenes[base], scenes.scenes[variant]
        assert a.group == b.group and a.change is None and b.change == change
        assert a.object_regions == b.object_regions and a.background == b.background
        differences = [
            (k, field.name)
            for k, (x, y) in enumerate(zip(a.objects, b.objects))
            for field in fields(x)
            if getattr(x, field.name) != getattr(y, field.name)
        ]
        assert differences == [(change.object_index, change.kind)]
        assert getattr(a.objects[change.object_index], change.kind) == change.old
        assert getattr(b.objects[change.object_index], change.kind) == change.new
        table = OBJECTS if change.kind == "noun" else ATTRIBUTES[change.kind]
        # captions of the variant naming the new value are false for the base
        mentions += sum(
            any(w in table[change.new] for w in tokenize(c)) for c in scenes.captions[5 * variant:5 * variant + 5]
        )
    assert mentions >= 0.6 * 5 * len(pairs)
    assert SyntheticScenes(8, seed=0, group_size=1, feature_dim=8).hard_negative_pairs() == []


def _mean_pooled(tokens, lengths):
    valid = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).to(tokens.dtype)
    pooled = (tokens * valid[..., None]).sum(1) / lengths.clamp(min=1)[:, None]
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_fine_grained_alignment_beats_global_pooling(scenes):
    # oracle encoders: regions projected onto the known concept prototypes, content words as one-hot concepts
    regions = torch.from_numpy(scenes.image_features) @ torch.from_numpy(scenes.concept_prototypes).T
    image_lengths = torch.from_numpy(scenes.image_lengths)
    words, text_lengths = scenes.oracle_word_features()
    fine = aladin_fast.alignment_scores(words, regions, text_lengths, image_lengths, backend="reference").T
    pooled = _mean_pooled(regions, image_lengths) @ _mean_pooled(words, text_lengths).T
    fine_metrics, pooled_metrics = retrieval_metrics(fine), retrieval_metrics(pooled)
    assert fine_metrics["t2i_r1"] > pooled_metrics["t2i_r1"] + 10
    assert fine_metrics["rsum"] > pooled_metrics["rsum"] + 20
    # untrained word features (fixed embeddings + noise) already carry signal with MrSw (first 100 images;
    # default backend: the C++ kernel when built, else the reference)
    raw_words, raw_lengths = scenes.word_features(range(500), noise=0.5)
    raw = aladin_fast.alignment_scores(
        raw_words, torch.from_numpy(scenes.image_features[:100]), raw_lengths, image_lengths[:100], normalize=True
    ).T
    raw_metrics = retrieval_metrics(raw)
    assert raw_metrics["t2i_r10"] > 40 and raw_metrics["i2t_r10"] > 40  # chance is 10%


def test_caption_phrases_are_the_mentioned_objects(scenes):
    for j, (phrases, mentioned) in enumerate(zip(scenes.caption_phrases, scenes.caption_objects)):
        scene = scenes.scenes[j // 5]
        assert len(phrases) == len(mentioned)
        words = set(tokenize(scenes.captions[j]))
        for concepts, k in zip(phrases, mentioned):
            obj = scene.objects[k]
            assert concepts[0] == obj.noun and set(concepts[1:]) <= {obj.colour, obj.size, obj.material}
            # every concept of the phrase is named in the caption (by one of its words)
            assert all(any(WORD_CONCEPT.get(w, (None, None))[1] == c for w in words) for c in concepts)
    features, lengths = scenes.oracle_phrase_features(range(10))
    assert features.shape[0] == 10 and lengths.tolist() == [len(p) for p in scenes.caption_phrases[:10]]
    assert torch.allclose(features.sum(-1)[torch.arange(features.shape[1])[None] < lengths[:, None]], torch.tensor(1.0))


def test_hard_negatives_need_binding(scenes):
    """Attribute values repeat inside a scene, so only phrase-level (binding) alignment tells most variants apart."""
    from aladin_fast.acceptance import oracle_checks

    checks = oracle_checks(scenes)
    phrases, words = checks["oracle phrases MrSw (binding)"], checks["oracle words MrSw (bag of words)"]
    best_global = max(checks["oracle global mean-pooled cosine"]["rsum"], checks["oracle global max-pooled cosine"]["rsum"])
    assert phrases["rsum"] > best_global + 20 and phrases["rsum"] > words["rsum"] + 20
    best_group = max(m["group_accuracy"] for name, m in checks.items() if "phrases" not in name)
    assert phrases["group_accuracy"] > best_group + 5


@pytest.mark.parametrize(
    "kwargs, match",
    [({"regions": 10}, "regions"), ({"group_size": 0}, "group_size"), ({"min_regions": 40}, "min_regions"),
     ({"feature_dim": 0}, "feature_dim"), ({"noise": -1.0}, "noise")],
)
def test_synthetic_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticScenes(4, **kwargs)


# ------------------------------------------------------------------ vocabulary
def test_vocabulary_round_trip(tmp_path):
    captions = ["A red cube, left of a BIG sphere.", "the man's red hat", "a cube"]
    vocabulary = Vocabulary.build(captions)
    assert vocabulary.itos[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert vocabulary.itos[4:7] == ["a", "cube", "red"]  # by frequency, then alphabetically
    ids = vocabulary.encode("A red cube left of a big sphere")
    assert ids[0] == vocabulary.bos_id and ids[-1] == vocabulary.eos_id
    assert vocabulary.decode(ids) == "a red cube left of a big sphere"
    assert vocabulary.decode(vocabulary.encode("the man's hat")) == "the man's hat"
    assert vocabulary.encode("a purple cube", add_special=False)[1] == vocabulary.unk_id
    assert isinstance(vocabulary, Tokenizer)
    path = tmp_path / "vocab.json"
    vocabulary.save(path)
    assert Vocabulary.load(path) == vocabulary
    assert json.loads(path.read_text())["words"][0] == "a"
    tokens, lengths = vocabulary.encode_batch(["a cube", "a red cube left"])
    assert tokens.shape == (2, 6) and lengths.tolist() == [4, 6] and tokens[0, 4:].tolist() == [0, 0]
    assert len(Vocabulary.build(captions, min_count=2)) == 4 + 3
    assert len(Vocabulary.build(captions, max_size=6)) == 6


def test_vocabulary_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocabulary file"):
        Vocabulary.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="format"):
        Vocabulary.load(bad)
    with pytest.raises(ValueError, match="twice"):
        Vocabulary(["a", "a"])
    with pytest.raises(ValueError, match="out of range"):
        Vocabulary(["a"]).decode([9])
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build([], min_count=0)


# ------------------------------------------------------------------ precomp
def _write_scan(root, split, images, captions):
    np.save(root / f"{split}_ims.npy", images)
    (root / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions))


def test_precomp_scan_array_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 4, 8)).astype(np.float32)
    captions = [f"caption {j} of image {j // 5}" for j in range(15)]
    _write_scan(tmp_path, "test", images, captions)
    dataset = PrecompDataset(tmp_path, "test")
    assert dataset.layout == "scan" and len(dataset) == 15 and dataset.num_images == 3 and dataset.feature_dim == 8
    image, caption, image_index = dataset[7]
    assert caption == "caption 7 of image 1" and image_index == 1
    np.testing.assert_array_equal(image, images[1])
    assert isinstance(dataset._images, np.memmap)  # memory-mapped, not read
    vocabulary = Vocabulary.build(captions)
    batch = PrecompCollator(vocabulary)([dataset[j] for j in (0, 7, 14)])
    assert batch.images.shape == (3, 4, 8) and batch.image_lengths.tolist() == [4, 4, 4]
    assert batch.image_indices.tolist() == [0, 1, 2] and batch.texts[1] == "caption 7 of image 1"
    assert vocabulary.decode(batch.tokens[1].tolist()) == "caption 7 of image 1"
    assert batch.token_lengths.tolist() == [7, 7, 7]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=PrecompCollator())
    assert sum(b.images.shape[0] for b in loader) == 15


def test_precomp_scan_folder_layout_numeric_order(tmp_path):
    folder = tmp_path / "dev_ims"
    folder.mkdir()
    rng = np.random.default_rng(1)
    per_image = [rng.standard_normal((r, 6)).astype(np.float32) for r in (3, 5, 2)]
    for name, features in zip(("0", "2", "10"), per_image):  # numeric, not lexicographic, order
        np.save(folder / f"{name}.npy", features)
    (tmp_path / "dev_caps.txt").write_text("".join(f"c{j}\n" for j in range(15)))
    dataset = PrecompDataset(tmp_path, "dev", layout="scan")
    assert dataset.image_lengths.tolist() == [3, 5, 2]
    np.testing.assert_array_equal(dataset[14].image, per_image[2])
    batch = PrecompCollator()([dataset[0], dataset[5], dataset[10]])
    assert batch.images.shape == (3, 5, 6) and batch.image_lengths.tolist() == [3, 5, 2]
    assert not batch.images[2, 2:].any() and batch.tokens is None
    np.save(folder / "11.npy", np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match="disagree on D"):
        PrecompDataset(tmp_path, "dev")


def test_precomp_tokens_layout_with_words(tmp_path):
    scenes = SyntheticScenes(4, seed=2, feature_dim=16)
    words, word_lengths = scenes.word_features()
    save_precomp(tmp_path, "train", scenes.image_features, scenes.captions, image_lengths=scenes.image_lengths,
                 word_features=(words.numpy(), word_lengths.numpy()), layout="tokens")
    dataset = PrecompDataset(tmp_path, "train")
    assert dataset.layout == "tokens"
    assert dataset.image_lengths.tolist() == scenes.image_lengths.tolist()
    for j in (0, 9, 19):
        item = dataset[j]
        np.testing.assert_array_equal(item.image, scenes.image_features[j // 5, : scenes.image_lengths[j // 5]])
        assert item.caption == scenes.captions[j]
        np.testing.assert_array_equal(dataset.word_features(j), words[j, : word_lengths[j]].numpy())
    (tmp_path / "train" / "captions.txt").unlink()  # word features only: items carry them as the caption
    batch = PrecompCollator()([PrecompDataset(tmp_path, "train")[j] for j in (0, 1)])
    assert batch.texts is None and batch.words.shape == (2, int(word_lengths[:2].max()), 16)
    assert batch.word_lengths.tolist() == word_lengths[:2].tolist()


def test_save_precomp_scan_round_trip(tmp_path):
    scenes = SyntheticScenes(3, seed=4, feature_dim=8)
    save_precomp(tmp_path, "test", scenes.image_features, scenes.captions)
    dataset = PrecompDataset(tmp_path, "test")
    assert dataset.captions == scenes.captions
    np.testing.assert_array_equal(dataset.image(2), scenes.image_features[2])


@settings(max_examples=60, derandomize=True, deadline=None)
@given(captions=st.lists(st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",))),
                         min_size=5, max_size=5))
def test_save_precomp_captions_round_trip_any_text(tmp_path_factory, captions):
    """Any caption without a line break comes back as written -- separators that str.splitlines() also
    breaks at (\v, \f, \x1c-\x1e, \x85, \u2028, \u2029) included, empty and blank captions included."""
    for layout in ("scan", "tokens"):
        root = tmp_path_factory.mktemp(layout)
        save_precomp(root, "test", np.zeros((1, 2, 4), np.float32), captions, layout=layout)
        assert PrecompDataset(root, "test", layout=layout).captions == captions


def test_precomp_reads_crlf_caption_files(tmp_path):
    np.save(tmp_path / "test_ims.npy", np.zeros((1, 2, 4), np.float32))
    (tmp_path / "test_caps.txt").write_bytes("a dog\r\nb\u2028c\r\n\r\nd\r\ne".encode())
    assert PrecompDataset(tmp_path, "test").captions == ["a dog", "b\u2028c", "", "d", "e"]


def test_precomp_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="root folder"):
        PrecompDataset(tmp_path / "nowhere", "test")
    with pytest.raises(FileNotFoundError, match="no precomputed split 'test'"):
        PrecompDataset(tmp_path, "test")
    with pytest.raises(ValueError, match="layout"):
        PrecompDataset(tmp_path, "test", layout="coco")
    np.save(tmp_path / "a_ims.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(FileNotFoundError, match="captions file"):
        PrecompDataset(tmp_path, "a")
    (tmp_path / "a_caps.txt").write_text("x\n" * 9)
    with pytest.raises(ValueError, match=r"9 captions for 2 images; expected .* = 10"):
        PrecompDataset(tmp_path, "a")
    np.save(tmp_path / "b_ims.npy", np.zeros((2, 12), np.float32))
    (tmp_path / "b_caps.txt").write_text("x\n" * 10)
    with pytest.raises(ValueError, match=r"must be \[N_images, R, D\]"):
        PrecompDataset(tmp_path, "b")
    folder = tmp_path / "c"
    folder.mkdir()
    np.save(folder / "regions.npy", np.zeros((5, 4), np.float32))
    with pytest.raises(FileNotFoundError, match="region offsets"):
        PrecompDataset(tmp_path, "c")
    np.save(folder / "region_offsets.npy", np.array([0, 3, 4]))
    with pytest.raises(ValueError, match="end at the row count 5"):
        PrecompDataset(tmp_path, "c")
    np.save(folder / "region_offsets.npy", np.array([0, 3, 5]))
    with pytest.raises(FileNotFoundError, match="missing captions"):
        PrecompDataset(tmp_path, "c")
    np.save(folder / "words.npy", np.zeros((7, 4), np.float32))
    np.save(folder / "word_offsets.npy", np.arange(10))
    with pytest.raises(ValueError, match="word_offsets.npy has 9 captions for 2 images"):
        PrecompDataset(tmp_path, "c")
    dataset_ok = np.zeros((2, 3, 4), np.float32)
    save_precomp(tmp_path, "d", dataset_ok, ["x"] * 10)
    with pytest.raises(IndexError, match="caption index 10"):
        PrecompDataset(tmp_path, "d")[10]
    with pytest.raises(ValueError, match="line breaks"):
        save_precomp(tmp_path, "e", dataset_ok, ["x\ny"] * 10)
    with pytest.raises(ValueError, match="one D"):
        pad_features([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(TypeError, match="tokenizer"):
        PrecompCollator(tokenizer=object())
