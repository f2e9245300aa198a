"""Property-based tests of the data pipeline and the command lines.

* tokenize / Vocabulary: arbitrary unicode (case folding, combining marks, ligatures, zero-width characters,
  emoji; surrogates excluded) -- no letter or digit is lost, tokens are stable, encode / decode / save / load
  round trips, build ordering (frequency, then alphabetical; caption order does not matter), min_count, max_size.
* PrecompDataset / PrecompCollator / save_precomp / pad_features: random N, R, D, captions per image, float16 /
  float32, both layouts (tokens with lengths, empty images, word features), per-image folders with numeric and
  non-numeric names; collated batches equal manual padding.
* SyntheticScenes: determinism per seed and the documented shapes, lengths and ground-truth invariants.
* TrainConfig flags and files: every field's flag round-trips its value ("none" included, over a config file too),
  TOML / JSON (/ YAML) files round-trip, validate() names the bad field, bad flags exit 2 without a traceback;
  ``index`` / ``search`` refuse bad inputs with a message (no traceback, nothing written) and otherwise agree
  with the library.

Default run: derandomized samples (a few seconds each); ``pytest -m slow`` runs the bigger profile.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import re
import string
import tempfile
import unicodedata
from collections import Counter
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aladin_fast import cli as top_cli
from aladin_fast.data import PrecompCollator, PrecompDataset, SyntheticScenes, Vocabulary, pad_features, save_precomp
from aladin_fast.data import tokenize
from aladin_fast.data.synthetic import ATTRIBUTES, OBJECTS
from aladin_fast.data.vocab import SPECIAL_TOKENS, pad_ids
from aladin_fast.retrieval import cli as retrieval_cli
from aladin_fast.training import TrainConfig
from aladin_fast.training import command as train_command
from aladin_fast.training.config import STAGES, config_from_arguments

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEFAULT = settings(max_examples=60, derandomize=True, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL = settings(DEFAULT, max_examples=25)
THOROUGH = settings(max_examples=600, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TEXT = st.characters(exclude_categories=("Cs",))  # any code point but surrogates (not encodable)
IN_WORD_FORMAT = "\u00ad\u200c\u200d\u2060\ufeff"  # soft hyphen, ZWNJ, ZWJ, word joiner, BOM: removed in words


# ===================================================================== tokenize / Vocabulary
def _normalized(text: str) -> str:
    """What the documented tokenizer sees: NFKC + case folding (plain lower() for ASCII)."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _alnum(text: str) -> str:
    return "".join(c for c in text if c.isalnum() and c != "_")


def _check_tokens(text: str) -> list:
    tokens = tokenize(text)
    # nothing lost: every letter / digit of the (normalised) text is in the tokens, in order, and nothing else
    assert _alnum("".join(tokens)) == _alnum(_normalized(text).translate(dict.fromkeys(map(ord, IN_WORD_FORMAT)))), \
        (text, tokens)
    for token in tokens:
        assert token and token[0].isalnum() and token[-1] != "'" and not any(c.isspace() for c in token), token
        assert tokenize(token) == [token], token  # a token is stable (idempotent normalisation)
    assert tokenize(" ".join(tokens)) == tokens
    return tokens


@DEFAULT
@given(text=st.text(TEXT, max_size=40))
def test_tokenize_keeps_every_letter_and_digit(text):
    _check_tokens(text)


LETTERS = (string.ascii_letters + "àáâäåæçèéêëìíîïñòóöøùúûüýÿßœ" + "αβγδεζηθικλμνξοπρσςτυφχψω"
           + "абвгдежзийклмнопрстуфхцчшщыьэюя")


@DEFAULT
@given(words=st.lists(st.text(st.sampled_from(LETTERS + string.digits), min_size=1, max_size=8), max_size=6),
       separators=st.lists(st.sampled_from([" ", "  ", ", ", ". ", "\t", "\n", "!? ", " - ", "\u200b", "\u3000"]),
                           min_size=6, max_size=6),
       marks=st.booleans())
def test_tokenize_words_of_any_script_stay_whole_and_case_folded(words, separators, marks):
    """A word of letters (accented, Greek, Cyrillic, ß) is one token, in any case, composed or decomposed."""
    text = "".join(w + s for w, s in zip(words, separators))
    if marks:
        text = unicodedata.normalize("NFD", text)  # accents as combining marks: must not split the words
    expected = [unicodedata.normalize("NFKC", w.casefold()) for w in words]
    assert _check_tokens(text) == expected
    assert tokenize(text.upper()) == expected and tokenize(text.lower()) == expected


@DEFAULT
@given(text=st.text(st.characters(max_codepoint=127), max_size=60))
def test_tokenize_ascii_unchanged_and_agrees_with_the_unicode_path(text):
    """ASCII text: the documented [a-z0-9] words; the same words when a non-ASCII word forces the unicode path."""
    words = re.findall(r"[a-z0-9]+(?:'[a-z0-9]+)*", text.lower())
    assert tokenize(text) == words
    assert tokenize(text + " é") == words + ["é"] and tokenize("é " + text) == ["é"] + words


def test_tokenize_unicode_regressions():
    """Old tokenizer: [a-z0-9] after lower() dropped every other letter: 'café' -> 'caf', 'naïve' -> 'na', 've'."""
    assert tokenize("Café naïve STRASSE Straße ﬁsh") == ["café", "naïve", "strasse", "strasse", "fish"]
    assert tokenize("nai\u0308ve") == tokenize("naïve") == ["naïve"]  # combining diaeresis composed (NFKC)
    assert tokenize("İstanbul") == ["i\u0307stanbul"]  # Turkish capital I with dot: the dot stays in the word
    assert tokenize("the man’s hat") == tokenize("the man's hat") == ["the", "man's", "hat"]
    assert tokenize("co\u00adoperate zero\u200bwidth") == ["cooperate", "zero", "width"]
    assert tokenize("😀 dog 🐕‍🦺, ＤＯＧ x²") == ["dog", "dog", "x2"]
    assert tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs are marks: one word each
    assert tokenize("") == [] and tokenize("...!") == []
    with pytest.raises(TypeError, match="str"):
        tokenize(b"bytes")


CAPTION_WORDS = ["a", "dog", "Dog", "DOG", "café", "CAFÉ", "naïve", "Straße", "strasse", "man's", "man’s",
                 "x1", "zz", "b", "ω", "Ω", "é", "e"]


@DEFAULT
@given(captions=st.lists(st.lists(st.sampled_from(CAPTION_WORDS), max_size=7)
                         .map(lambda ws: " ".join(ws)), max_size=12),
       min_count=st.integers(1, 3), max_size=st.none() | st.integers(4, 12), seed=st.randoms(use_true_random=False))
def test_vocabulary_build_order_min_count_max_size_and_determinism(captions, min_count, max_size, seed):
    vocabulary = Vocabulary.build(captions, min_count=min_count, max_size=max_size)
    counts = Counter(word for caption in captions for word in tokenize(caption))
    expected = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    if max_size is not None:
        expected = expected[: max_size - len(SPECIAL_TOKENS)]
    assert vocabulary.itos == [*SPECIAL_TOKENS, *expected]
    assert len(vocabulary) == len(vocabulary.stoi) and all(vocabulary.stoi[w] == i for i, w in enumerate(vocabulary.itos))
    shuffled = list(captions)
    seed.shuffle(shuffled)
    assert Vocabulary.build(shuffled, min_count=min_count, max_size=max_size) == vocabulary  # ties: alphabetical
    for caption in captions:
        ids = vocabulary.encode(caption)
        words = tokenize(caption)
        assert ids == [vocabulary.bos_id, *(vocabulary.stoi.get(w, vocabulary.unk_id) for w in words), vocabulary.eos_id]
        assert vocabulary.encode(caption, add_special=False) == ids[1:-1]
        assert vocabulary.decode(ids) == " ".join(w if w in vocabulary else "<unk>" for w in words)
        assert vocabulary.decode(ids, skip_special=False).split(" ")[0] == "<bos>"
    tokens, lengths = vocabulary.encode_batch(captions)
    manual = [vocabulary.encode(c) for c in captions]
    assert lengths.tolist() == [len(m) for m in manual] and tokens.dtype == torch.int64
    assert tokens.shape == (len(captions), max((len(m) for m in manual), default=0))
    for row, ids in enumerate(manual):
        assert tokens[row, : len(ids)].tolist() == ids and not tokens[row, len(ids):].any()


@DEFAULT
@given(text=st.text(TEXT, max_size=40))
def test_vocabulary_encode_decode_round_trip_any_text(text):
    vocabulary = Vocabulary.build([text])
    ids = vocabulary.encode(text)
    assert vocabulary.unk_id not in ids  # every word of the text is in its own vocabulary
    assert vocabulary.decode(ids) == " ".join(tokenize(text))
    assert vocabulary.encode(vocabulary.decode(ids)) == ids


@DEFAULT
@given(words=st.lists(st.text(TEXT, min_size=1, max_size=12), unique=True, max_size=12),
       probe=st.text(TEXT, max_size=30))
def test_vocabulary_save_load_round_trip_any_words(words, probe):
    assume(not set(words) & set(SPECIAL_TOKENS))
    vocabulary = Vocabulary(words)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "vocab.json")
        vocabulary.save(path)
        loaded = Vocabulary.load(path)
        assert os.listdir(folder) == ["vocab.json"]  # no temporary file left behind
    assert loaded == vocabulary and loaded.itos == vocabulary.itos and loaded.stoi == vocabulary.stoi
    assert loaded.encode(probe) == vocabulary.encode(probe)


def test_vocabulary_load_refuses_bad_words(tmp_path):
    """'words' missing raised KeyError; a string was split into one-letter words."""
    header = {"format": "aladin_fast.Vocabulary", "version": 1, "special": list(SPECIAL_TOKENS)}
    for words in (None, "abc", {"a": 1}, 3):
        path = tmp_path / "v.json"
        path.write_text(json.dumps({**header, **({} if words is None else {"words": words})}))
        with pytest.raises(ValueError, match="words"):
            Vocabulary.load(path)
    path.write_text(json.dumps({**header, "words": ["a", 3]}))
    with pytest.raises(ValueError, match="non-empty strings"):
        Vocabulary.load(path)


@DEFAULT
@given(sequences=st.lists(st.lists(st.integers(-5, 2**40), max_size=6), max_size=6), pad=st.integers(-3, 3))
def test_pad_ids_matches_manual_padding(sequences, pad):
    out, lengths = pad_ids(sequences, pad)
    width = max((len(s) for s in sequences), default=0)
    assert out.shape == (len(sequences), width) and out.dtype == torch.int64 and lengths.dtype == torch.int64
    assert out.tolist() == [list(s) + [pad] * (width - len(s)) for s in sequences]
    assert lengths.tolist() == [len(s) for s in sequences]


# ===================================================================== precomputed features
DTYPES = {"float16": np.float16, "float32": np.float32}
CAPTION_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), max_size=12)


@st.composite
def precomp_splits(draw):
    count = draw(st.integers(0, 4))
    width = draw(st.integers(0, 5))
    dim = draw(st.integers(1, 6))
    per_image = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    layout = draw(st.sampled_from(["scan", "tokens"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    features = rng.standard_normal((count, width, dim)).astype(DTYPES[dtype])
    lengths = [draw(st.integers(0, width)) for _ in range(count)] if layout == "tokens" else [width] * count
    captions = draw(st.lists(CAPTION_TEXT, min_size=count * per_image, max_size=count * per_image))
    words = None
    if layout == "tokens" and draw(st.booleans()):
        word_width = draw(st.integers(0, 4))
        words = (rng.standard_normal((count * per_image, word_width, dim)).astype(DTYPES[dtype]),
                 [draw(st.integers(0, word_width)) for _ in range(count * per_image)])
        if draw(st.booleans()):
            captions = None  # word features only: items carry them as the caption
    return dict(features=features, lengths=lengths, captions=captions, words=words, layout=layout,
                per_image=per_image, dtype=dtype, out_dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                batch=draw(st.lists(st.integers(0, max(count * per_image - 1, 0)), min_size=1, max_size=6)))


def _check_precomp(case):
    features, lengths, captions, words = case["features"], case["lengths"], case["captions"], case["words"]
    count, per_image = features.shape[0], case["per_image"]
    with tempfile.TemporaryDirectory() as root:
        save_precomp(root, "split", features, captions, layout=case["layout"],
                     image_lengths=lengths if case["layout"] == "tokens" else None, word_features=words)
        dataset = PrecompDataset(root, "split", captions_per_image=per_image)
        assert dataset.layout == case["layout"] and len(dataset) == count * per_image == dataset.num_captions
        assert dataset.num_images == count and dataset.image_lengths.tolist() == lengths
        assert dataset.image_lengths.dtype == np.int64 and dataset.feature_dim == features.shape[2]
        assert dataset.captions == (None if captions is None else list(captions))
        for i in range(count):
            image = dataset.image(i)
            assert image.dtype == features.dtype  # stored as given (float16 stays float16)
            np.testing.assert_array_equal(image, features[i, : lengths[i]])
            np.testing.assert_array_equal(dataset.image(i - count), image)
        for j in range(len(dataset)):
            item = dataset[j]
            assert item.image_index == j // per_image and dataset[j - len(dataset)].image_index == item.image_index
            if captions is not None:
                assert item.caption == captions[j]
            if words is not None:
                expected = words[0][j, : words[1][j]]
                np.testing.assert_array_equal(dataset.word_features(j), expected)
                np.testing.assert_array_equal(dataset.word_features(j - len(dataset)), expected)
                if captions is None:
                    np.testing.assert_array_equal(item.caption, expected)
        with pytest.raises(IndexError):
            dataset[len(dataset)]
        if words is not None:
            with pytest.raises(IndexError):
                dataset.word_features(len(dataset))
        if not len(dataset):
            return
        items = [dataset[j] for j in case["batch"]]
        vocabulary = Vocabulary.build(captions or [])
        batch = PrecompCollator(vocabulary, dtype=case["out_dtype"])(items)
        rows = [features[j // per_image, : lengths[j // per_image]] for j in case["batch"]]
        width = max(r.shape[0] for r in rows)
        manual = np.zeros((len(rows), width, features.shape[2]), np.float32)
        for slot, r in enumerate(rows):
            manual[slot, : r.shape[0]] = r
        assert batch.images.dtype == case["out_dtype"] and batch.images.shape == manual.shape
        assert torch.equal(batch.images, torch.from_numpy(manual).to(case["out_dtype"]))
        assert batch.image_lengths.tolist() == [r.shape[0] for r in rows]
        assert batch.image_indices.tolist() == [j // per_image for j in case["batch"]]
        if captions is not None:
            texts = [captions[j] for j in case["batch"]]
            assert batch.texts == texts and batch.words is None
            tokens, token_lengths = vocabulary.encode_batch(texts)
            assert torch.equal(batch.tokens, tokens) and torch.equal(batch.token_lengths, token_lengths)
        else:
            expected_words, expected_lengths = pad_features([words[0][j, : words[1][j]] for j in case["batch"]],
                                                            case["out_dtype"])
            assert batch.texts is None and batch.tokens is None
            assert torch.equal(batch.words, expected_words) and torch.equal(batch.word_lengths, expected_lengths)


@DEFAULT
@given(case=precomp_splits())
def test_precomp_round_trip_and_collator_equals_manual_padding(case):
    _check_precomp(case)


@st.composite
def image_folders(draw):
    numeric = draw(st.booleans())
    count = draw(st.integers(1, 6))
    if numeric:  # zero-padded or not, unicode decimal digits too ("٣" is 3)
        values = draw(st.lists(st.integers(0, 120), min_size=count, max_size=count, unique=True))
        stems = [draw(st.sampled_from(["{}", "0{}", "00{}"])).format(v) for v in values]
        if draw(st.booleans()):
            stems[0] = stems[0].translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    else:
        stems = draw(st.lists(st.text(st.sampled_from("ab_-.xyz019²"), min_size=1, max_size=5), min_size=count,
                              max_size=count, unique=True))
        assume(not all(s.isdecimal() for s in stems))
    return stems, [draw(st.integers(0, 4)) for _ in stems], draw(st.integers(1, 5)), draw(st.integers(1, 3))


@DEFAULT
@given(folder=image_folders())
def test_precomp_image_folder_order_and_lengths(folder):
    stems, region_counts, dim, per_image = folder
    with tempfile.TemporaryDirectory() as root:
        os.mkdir(os.path.join(root, "dev_ims"))
        arrays = {}
        for k, (stem, regions) in enumerate(zip(stems, region_counts)):
            arrays[stem] = np.full((regions, dim), k + 1, np.float32)
            np.save(os.path.join(root, "dev_ims", f"{stem}.npy"), arrays[stem])
        with open(os.path.join(root, "dev_caps.txt"), "w", encoding="utf-8") as handle:
            handle.write("".join(f"caption {j}\n" for j in range(per_image * len(stems))))
        dataset = PrecompDataset(root, "dev", captions_per_image=per_image)
        order = [os.path.basename(path)[:-4] for path in dataset._image_files]
        assert sorted(order) == sorted(stems)  # every file once
        if all(s.isdecimal() for s in stems):
            assert [int(s) for s in order] == sorted(int(s) for s in stems)  # numeric order
        else:
            assert order == sorted(stems, key=lambda stem: f"{stem}.npy")  # file name order ("0..npy" < "0.npy")
        assert dataset.image_lengths.tolist() == [arrays[s].shape[0] for s in order]
        for i, stem in enumerate(order):
            np.testing.assert_array_equal(dataset.image(i), arrays[stem])
        batch = PrecompCollator()([dataset[j] for j in range(len(dataset))])
        assert batch.image_lengths.tolist() == [arrays[order[j // per_image]].shape[0] for j in range(len(dataset))]


def test_precomp_folder_with_non_decimal_digit_names(tmp_path):
    """'²'.isdigit() is True but int('²') raises: such a folder crashed with 'invalid literal for int()'."""
    (tmp_path / "dev_ims").mkdir()
    np.save(tmp_path / "dev_ims" / "2.npy", np.zeros((1, 3), np.float32))
    np.save(tmp_path / "dev_ims" / "².npy", np.ones((2, 3), np.float32))
    (tmp_path / "dev_caps.txt").write_text("c\n" * 10)
    dataset = PrecompDataset(tmp_path, "dev")
    assert dataset.image_lengths.tolist() == [1, 2]  # name order: "2" < "²"


def test_precomp_word_features_negative_and_out_of_range_index(tmp_path):
    """word_features(-1) returned an empty array (offsets[-1]:offsets[0]) instead of the last caption's words."""
    words = np.arange(2 * 5 * 3 * 2, dtype=np.float32).reshape(10, 3, 2)
    save_precomp(tmp_path, "s", np.ones((2, 3, 2), np.float32), None, layout="tokens", word_features=(words, [3] * 10))
    dataset = PrecompDataset(tmp_path, "s")
    np.testing.assert_array_equal(dataset.word_features(-1), words[9])
    np.testing.assert_array_equal(dataset.word_features(-10), words[0])
    for index in (10, -11):
        with pytest.raises(IndexError, match="caption index"):
            dataset.word_features(index)


def test_save_precomp_refuses_what_it_would_lose_or_break(tmp_path):
    """The scan layout dropped word_features and image_lengths silently (padding rows came back as regions);
    word lengths beyond W or negative wrote a split the loader then refused."""
    images = np.ones((2, 3, 4), np.float32)
    words = (np.ones((10, 2, 4), np.float32), [2] * 10)
    with pytest.raises(ValueError, match="word_features"):
        save_precomp(tmp_path, "a", images, ["x"] * 10, word_features=words)
    with pytest.raises(ValueError, match="image_lengths"):
        save_precomp(tmp_path, "b", images, ["x"] * 10, image_lengths=[3, 1])
    assert not os.listdir(tmp_path)  # nothing written
    save_precomp(tmp_path, "c", images, ["x"] * 10, image_lengths=[3, 3])  # all R: nothing lost
    assert PrecompDataset(tmp_path, "c").image_lengths.tolist() == [3, 3]
    for bad in ([3] * 10, [-1] + [1] * 9, [1] * 9, [1.5] * 10):
        with pytest.raises(ValueError, match="word_features"):
            save_precomp(tmp_path, "d", images, None, layout="tokens", word_features=(words[0], bad))
    for bad in ([4, 1], [-1, 1], [1], [0.5, 1], ["a", "b"]):
        with pytest.raises(ValueError, match="image_lengths"):
            save_precomp(tmp_path, "e", images, ["x"] * 10, layout="tokens", image_lengths=bad)
    save_precomp(tmp_path, "f", images, ["x"] * 10, layout="tokens", image_lengths=np.array([2.0, 0.0]),
                 word_features=(words[0], np.array([2, 0] * 5, np.int32)))
    assert PrecompDataset(tmp_path, "f").image_lengths.tolist() == [2, 0]
    save_precomp(tmp_path, "g", np.zeros((0, 3, 4), np.float32), [], layout="tokens", image_lengths=[])
    assert len(PrecompDataset(tmp_path, "g")) == 0


def test_pad_features_refuses_non_matrices():
    """A 0-d array raised IndexError (shape[-1] read before the ndim check)."""
    for arrays in ([np.float32(1.0)], [np.zeros(3)], [np.zeros((2, 3)), np.zeros((1, 2, 3))]):
        with pytest.raises(ValueError, match="one D"):
            pad_features(arrays)


# ===================================================================== synthetic scenes
WORD_CONCEPT = {word: (kind, concept) for kind, table in (("noun", OBJECTS), *ATTRIBUTES.items())
                for concept, words in table.items() for word in words}


@st.composite
def scene_settings(draw):
    regions = draw(st.integers(19, 28))
    return dict(num_images=draw(st.integers(0, 9)), seed=draw(st.integers(0, 2**40)), regions=regions,
                feature_dim=draw(st.integers(1, 12)), group_size=draw(st.integers(1, 5)),
                min_regions=draw(st.none() | st.integers(1, regions)), noise=draw(st.floats(0, 3)),
                diagnostic_prob=draw(st.floats(0, 1)), world_seed=draw(st.integers(0, 3)))


def _check_scenes(kwargs):
    count = kwargs["num_images"]
    a, b = SyntheticScenes(**kwargs), SyntheticScenes(**kwargs)
    assert a.scenes == b.scenes and a.captions == b.captions and a.caption_objects == b.caption_objects
    assert a.caption_phrases == b.caption_phrases
    features = a.image_features
    np.testing.assert_array_equal(features, b.image_features)
    regions, dim = kwargs["regions"], kwargs["feature_dim"]
    least = regions // 3 if kwargs["min_regions"] is None else kwargs["min_regions"]
    assert len(a) == count and features.shape == (count, regions, dim) and features.dtype == np.float32
    assert a.image_lengths.dtype == np.int64 and a.image_lengths.tolist() == [s.num_regions for s in a.scenes]
    assert all(least <= n <= regions for n in a.image_lengths.tolist())
    assert a.groups.tolist() == [i // kwargs["group_size"] for i in range(count)]
    for i, n in enumerate(a.image_lengths.tolist()):
        assert not features[i, n:].any() and np.isfinite(features[i]).all()
    subset = list(range(count))[::-1][:4]
    np.testing.assert_array_equal(a.region_features(subset), features[subset])
    with pytest.raises(IndexError):
        a.region_features([count])
    assert len(a.captions) == len(a.caption_objects) == len(a.caption_phrases) == 5 * count
    for i, scene in enumerate(a.scenes):
        assert 3 <= len(scene.objects) <= 6 and scene.group == i // kwargs["group_size"]
        assert len({o.noun for o in scene.objects}) == len({o.cell for o in scene.objects}) == len(scene.objects)
        assert all(1 <= r <= 3 for r in scene.object_regions) and len(scene.object_regions) == len(scene.objects)
        base = a.scenes[i - i % kwargs["group_size"]]
        assert (scene.change is None) == (i % kwargs["group_size"] == 0)
        if scene.change is not None:
            change = scene.change
            assert change.old != change.new and getattr(base.objects[change.object_index], change.kind) == change.old
            assert getattr(scene.objects[change.object_index], change.kind) == change.new
        for subject, relation, obj in scene.relations:
            (sr, sc), (orow, oc) = scene.objects[subject].cell, scene.objects[obj].cell
            assert {"left of": sc < oc, "right of": sc > oc, "above": sc == oc and sr < orow,
                    "below": sc == oc and sr > orow}[relation]
        for j in range(5 * i, 5 * i + 5):
            mentioned = [scene.objects[k] for k in a.caption_objects[j]]
            nouns = [c for kind, c in (WORD_CONCEPT[w] for w in tokenize(a.captions[j]) if w in WORD_CONCEPT)
                     if kind == "noun"]
            assert mentioned and sorted(nouns) == sorted(o.noun for o in mentioned), a.captions[j]
            assert [p[0] for p in a.caption_phrases[j]] == [o.noun for o in mentioned]
    pairs = a.hard_negative_pairs()
    assert len(pairs) == count - len(set(a.groups.tolist()))
    assert all(a.scenes[base].group == a.scenes[variant].group and a.scenes[variant].change == change
               for base, variant, change in pairs)
    words, lengths = a.word_features()
    assert lengths.tolist() == [len(tokenize(c)) for c in a.captions]
    assert words.shape == (5 * count, max(lengths.tolist(), default=0), dim) and words.dtype == torch.float32
    assert all(not words[j, n:].any() for j, n in enumerate(lengths.tolist()))
    assert torch.equal(a.word_features()[0], b.word_features()[0])
    oracle, oracle_lengths = a.oracle_word_features()
    assert oracle_lengths.tolist() == [sum(w in WORD_CONCEPT for w in tokenize(c)) for c in a.captions]
    assert oracle.shape[:2] == (5 * count, max(oracle_lengths.tolist(), default=0))
    phrases, phrase_lengths = a.oracle_phrase_features()
    assert phrase_lengths.tolist() == [len(p) for p in a.caption_phrases] and phrases.shape[0] == 5 * count


@SMALL
@given(kwargs=scene_settings())
def test_synthetic_scenes_deterministic_shapes_and_ground_truth(kwargs):
    _check_scenes(kwargs)


def test_synthetic_region_features_do_not_depend_on_the_subset():
    """Documented: "image i gets the same features whatever subset it is built in". The features were one BLAS
    product over the block's [images * R, K] coefficients, whose rounding depends on where a row falls in the
    matrix: region_features([2, 1, 0]) differed from image_features[[2, 1, 0]] by one float32 ulp."""
    scenes = SyntheticScenes(3, seed=0, regions=19, feature_dim=8, group_size=1, noise=0.0, diagnostic_prob=0.0)
    np.testing.assert_array_equal(scenes.region_features([2, 1, 0]), scenes.image_features[[2, 1, 0]])
    scenes = SyntheticScenes(70, seed=1, feature_dim=16)  # more than one 64-image block
    for subset in ([69, 3], [0], list(range(70))[::-1], [5, 5, 64]):
        np.testing.assert_array_equal(scenes.region_features(subset), scenes.image_features[subset])


@pytest.mark.parametrize("kwargs, match", [
    ({"seed": -1}, "seed"), ({"world_seed": -2}, "world_seed"), ({"seed": 1.5}, "seed"),
    ({"noise": float("nan")}, "noise"), ({"noise": float("inf")}, "noise"), ({"min_regions": 2.5}, "min_regions"),
])
def test_synthetic_refuses_seeds_and_noise_that_fail_later(kwargs, match):
    """Negative seeds were accepted and failed on the first feature access inside numpy ('expected non-negative
    integer'); NaN / inf noise gave NaN features."""
    with pytest.raises(ValueError, match=match):
        SyntheticScenes(4, regions=19, feature_dim=4, **kwargs)
    assert SyntheticScenes(2, seed=np.int64(3), feature_dim=4).image_features.shape == (2, 36, 4)


# ===================================================================== TrainConfig: flags and files
CONFIG_FIELDS = {item.name: str(item.type) for item in fields(TrainConfig)}
CHOICES = {"data": ("synthetic", "precomp"), "schedule": ("cosine", "constant"), "amp": ("auto", "bf16", "off"),
           "student_backbone": ("shared", "separate"), "hinge_reduction": ("sum", "mean"),
           "aggregation": ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean"), "padding": ("neg_inf", "zero"),
           "backend": ("auto", "cpu", "triton", "reference"), "baseline_loss": ("hinge", "infonce"),
           "baseline_pooling": ("first", "mean", "max"), "student_pooling": ("first", "mean", "max"),
           "device": ("auto", "cpu", "cuda", "cuda:1", "meta")}
UNIT_INTERVAL = {"dropout": (0.0, 0.999), "min_lr_ratio": (0.0, 1.0)}
POSITIVE_FLOATS = {"lr", "distill_temperature", "distill_teacher_temperature", "sinkhorn_epsilon",
                   "concept_temperature", "context_temperature", "baseline_temperature", "student_lr", "baseline_lr",
                   "teacher_seconds", "student_seconds", "baseline_seconds"}
POSITIVE_INTS = {"teacher_dim", "teacher_heads", "student_dim", "student_heads", "batch_size", "num_prototypes",
                 "sinkhorn_iterations", "context_top_k", "checkpoint_every", "eval_every", "log_every",
                 "synthetic_train_images", "synthetic_val_images", "synthetic_feature_dim", "vocabulary_min_count",
                 "teacher_ff_dim", "eval_max_images", "baseline_dim", "student_projection_hidden",
                 "baseline_projection_hidden"}
FREE_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=10)


@st.composite
def train_configs(draw):
    values = {}
    for name, kind in CONFIG_FIELDS.items():
        optional = kind.startswith("Optional[")
        if optional and draw(st.booleans()):
            values[name] = None
        elif name == "stages":
            values[name] = tuple(draw(st.lists(st.sampled_from(STAGES), min_size=1, max_size=3, unique=True)))
        elif name in CHOICES:
            values[name] = draw(st.sampled_from(CHOICES[name]))
        elif "bool" in kind:
            values[name] = draw(st.booleans())
        elif "int" in kind:
            values[name] = draw(st.integers(1 if name in POSITIVE_INTS else 0, 10**6))
        elif name in UNIT_INTERVAL:
            values[name] = draw(st.floats(*UNIT_INTERVAL[name]))
        elif "float" in kind:
            values[name] = draw(st.floats(min_value=0.0, exclude_min=name in POSITIVE_FLOATS,
                                          allow_infinity=name == "grad_clip"))
        else:  # free strings (data_root, output_dir, splits): "none" would mean None
            values[name] = draw(FREE_TEXT.filter(lambda text: text.lower() != "none"))
    values["teacher_dim"] = draw(st.integers(1, 4096))
    divisors = [d for d in range(1, 65) if values["teacher_dim"] % d == 0]
    values["teacher_heads"], values["student_heads"] = draw(st.sampled_from(divisors)), draw(st.sampled_from(divisors))
    if values["student_backbone"] == "shared" and values["freeze_teacher"]:
        values["concept_weight"] = 0.0
    for model in ("student", "baseline"):
        if values[f"{model}_pooling"] == "first":
            values[f"{model}_project_tokens"] = False
    if not (values["freeze_teacher"] and values["student_backbone"] == "shared"):
        values["cache_teacher_tokens"] = False
    if values["data"] == "precomp" and not values["data_root"]:
        values["data_root"] = "features"
    return TrainConfig(**values).validate()


def _flag_text(name: str, value, draw) -> str:
    if value is None:
        return draw(st.sampled_from(["none", "None", "NONE"]))
    if isinstance(value, bool):
        return draw(st.sampled_from({True: ["true", "True", "1", "yes", "YES"], False: ["false", "0", "no", "No"]}[value]))
    if isinstance(value, tuple):
        return draw(st.sampled_from([",", ",,"])).join(value)
    if isinstance(value, float):
        return draw(st.sampled_from([repr(value), f"{value:.17g}", f"{value:.17e}"]))
    return str(value)


def _argv(config: TrainConfig, draw) -> list:
    argv = ["train"]
    for name, value in config.to_dict().items():
        value = tuple(value) if name == "stages" else value
        flag, text = f"--{name.replace('_', '-')}", _flag_text(name, value, draw)
        argv += [f"{flag}={text}"] if text.startswith("-") or draw(st.booleans()) else [flag, text]
    return argv


def _toml(values: dict) -> str:
    def literal(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return "inf" if value == math.inf else repr(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        if isinstance(value, str):
            return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
        return str(value)
    return "".join(f"{name} = {literal(value)}\n" for name, value in values.items() if value is not None)


def _write_config(folder: str, config: TrainConfig, kind: str) -> str:
    values = config.to_dict()
    if kind.startswith("toml"):
        path, text = os.path.join(folder, "run.toml"), _toml(values)
        if kind == "toml-table":
            text = "[train]\n" + text
    elif kind == "yaml":
        import yaml

        path, text = os.path.join(folder, "run.yaml"), yaml.safe_dump(values, allow_unicode=True)
    else:
        path, text = os.path.join(folder, "run.json"), json.dumps({"train": values} if kind == "json-table" else values)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


FILE_KINDS = ["toml", "toml-table", "json", "json-table"] + (["yaml"] if importlib.util.find_spec("yaml") else [])


@DEFAULT
@given(config=train_configs(), kind=st.sampled_from(FILE_KINDS))
def test_config_file_round_trip(config, kind):
    with tempfile.TemporaryDirectory() as folder:
        assert TrainConfig.from_file(_write_config(folder, config, kind)) == config


@DEFAULT
@given(config=train_configs(), in_file=st.none() | train_configs(), kind=st.sampled_from(FILE_KINDS), data=st.data())
def test_every_flag_round_trips_its_value_over_a_config_file(config, in_file, kind, data):
    """Flags for every field give back the config -- 'none' for Optional fields too, even over a config file that
    sets them (the old parser turned 'none' into 'not given', so the file's value silently stayed)."""
    args = train_command.build_parser().parse_args(_argv(config, data.draw))
    if in_file is None:
        assert config_from_arguments(args) == config
        return
    with tempfile.TemporaryDirectory() as folder:
        assert config_from_arguments(args, _write_config(folder, in_file, kind)) == config


def test_none_flag_overrides_a_config_file_value(tmp_path):
    (tmp_path / "run.toml").write_text('teacher_text_layers = 2\nstudent_lr = 0.5\noutput_dir = "runs/x"\n')
    args = train_command.build_parser().parse_args(
        ["train", "--teacher-text-layers", "none", "--student-lr", "None", "--output-dir", "none"])
    config = config_from_arguments(args, str(tmp_path / "run.toml"))
    assert (config.teacher_text_layers, config.student_lr, config.output_dir) == (None, None, None)
    args = train_command.build_parser().parse_args(["train"])
    assert config_from_arguments(args, str(tmp_path / "run.toml")).teacher_text_layers == 2


def _bad_values(name: str, kind: str) -> list:
    """Values validate() must refuse for field ``name``: wrong types, NaN, out of range."""
    bad = [[1], {"a": 1}]
    if name == "stages":
        return bad + ["teacher", (), ("teacher", "teacher"), ("bogus",), 3, None, (1,)]
    if name in CHOICES:
        return bad + ["bogus", 3, None, True]
    if "bool" in kind:
        return bad + ["false", "true", 0, 1, None, 1.0]
    if "int" in kind:
        least = 1 if name in POSITIVE_INTS else 0
        return bad + ["3", 1.5, float("nan"), True, least - 1] + ([] if kind.startswith("Optional") else [None])
    if "float" in kind:
        values = bad + ["0.1", True, float("nan"), -1.0] + ([] if kind.startswith("Optional") else [None])
        if name in POSITIVE_FLOATS:
            values.append(0.0)
        if name in UNIT_INTERVAL:
            values += [1.5, math.inf] if name == "min_lr_ratio" else [1.0, math.inf]
        elif name != "grad_clip":  # session 8: an infinite lr / weight / time budget is refused (grad_clip: no clip)
            values.append(math.inf)
        return values
    return bad + [3, b"bytes"] + ([] if kind.startswith("Optional") else [None])


def test_validate_names_the_field_for_every_bad_value():
    """Every field refuses wrong types, NaN and out-of-range values with a ValueError naming it (was: 'false'
    strings and NaN weights accepted, a string dropout or an int stages raised TypeError)."""
    for name, kind in CONFIG_FIELDS.items():
        for value in _bad_values(name, kind):
            with pytest.raises(ValueError) as error:
                TrainConfig(**{name: value}).validate()
            assert str(error.value).startswith(name), (name, value, str(error.value))
            if value is not None and not isinstance(value, bytes):  # files: from_dict too (stages lists included)
                with pytest.raises(ValueError, match=name):
                    TrainConfig.from_dict({name: value})
    for config in (TrainConfig(), TrainConfig(data="precomp", data_root="x", teacher_text_layers=0, device="cuda:3")):
        assert config.validate() is config


def _bad_flag_texts(name: str, kind: str) -> list:
    if name == "stages":
        return ["", "bogus", "teacher,teacher", "teacher, student"]
    if name in CHOICES:
        return ["bogus", ""]
    if "bool" in kind:
        return ["maybe", "", "2", "none"]
    if "int" in kind:
        return ["x", "1.5", "", str((1 if name in POSITIVE_INTS else 0) - 1)] + (
            [] if kind.startswith("Optional") else ["none"])
    if "float" in kind:
        texts = ["x", "", "nan", "-1"] + ([] if kind.startswith("Optional") else ["none"])
        return texts + (["0"] if name in POSITIVE_FLOATS else []) + (["1.5"] if name in UNIT_INTERVAL else [])
    return []  # free strings: any text is a value


def _run_cli(main, argv):
    """``main(argv)`` in process: (exit code, stderr, stdout); any exception but SystemExit fails the test."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits with status 1
        err.write(code + "\n")
        code = 1
    return code, err.getvalue(), out.getvalue()


def _no_training(monkeypatch):
    """These command lines must stop before any data is built (a valid one would start a long training run)."""
    def refuse(config):
        raise AssertionError(f"a bad command line reached build_datasets: {config}")
    monkeypatch.setattr("aladin_fast.training.data.build_datasets", refuse)


def test_bad_train_flags_exit_2_naming_the_flag_without_traceback(monkeypatch):
    """Was: '--progress maybe' raised KeyError; '--teacher-dim 0', a missing or malformed --config and a missing
    data root raised tracebacks; '--teacher-dim none' silently trained with the default."""
    _no_training(monkeypatch)
    for name, kind in CONFIG_FIELDS.items():
        flag = f"--{name.replace('_', '-')}"
        for text in _bad_flag_texts(name, kind):
            for main, argv in ((train_command.main, ["train", f"{flag}={text}"]),
                               (top_cli.main, ["train", f"{flag}={text}"])):
                code, stderr, stdout = _run_cli(main, argv)
                assert code == 2 and (flag in stderr or name in stderr), (argv, code, stderr)
                assert "Traceback" not in stderr and not stdout


def test_bad_config_files_and_data_exit_2(tmp_path):
    (tmp_path / "bad.toml").write_text("teacher_dim = \n")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "unknown.toml").write_text("epochs = 3\n")
    (tmp_path / "wrong.toml").write_text('freeze_teacher = "false"\n')
    (tmp_path / "run.txt").write_text("")
    (tmp_path / "seed.toml").write_text("synthetic_seed = -1\n")
    cases = [(["--config", str(tmp_path / "missing.toml")], "not found"), (["--config", str(tmp_path / "bad.toml")], "TOML"),
             (["--config", str(tmp_path / "bad.json")], "JSON"), (["--config", str(tmp_path / "list.json")], "mapping"),
             (["--config", str(tmp_path / "unknown.toml")], "epochs"),
             (["--config", str(tmp_path / "wrong.toml")], "freeze_teacher"),
             (["--config", str(tmp_path / "run.txt")], "must end in"),
             (["--config", str(tmp_path / "seed.toml")], "synthetic_seed"),
             (["--data", "precomp", "--data-root", str(tmp_path / "nowhere")], "root folder"),
             (["--device", "gpu"], "device"), (["--synthetic-seed=-1"], "synthetic_seed"),
             (["--data", "precomp", "--data-root", str(tmp_path)], "no precomputed split")]
    if not torch.cuda.is_available():  # was: AssertionError "Torch not compiled with CUDA enabled" traceback
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for flags, message in cases:
        code, stderr, _ = _run_cli(train_command.main, ["train", *flags])
        assert code == 2 and message in stderr and "Traceback" not in stderr, (flags, stderr)


# ===================================================================== index / search command lines
@st.composite
def galleries(draw):
    count, dim, width, token_dim = (draw(st.integers(1, 8)), draw(st.integers(1, 6)), draw(st.integers(1, 5)),
                                    draw(st.integers(1, 6)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return dict(embeddings=rng.standard_normal((count, dim)).astype(np.float32),
                tokens=rng.standard_normal((count, width, token_dim)).astype(draw(st.sampled_from(DTYPES_NP))),
                lengths=np.array([draw(st.integers(1, width)) for _ in range(count)]),
                ids=np.array(draw(st.lists(st.integers(0, 2**40), min_size=count, max_size=count, unique=True))),
                queries=rng.standard_normal((draw(st.integers(1, 3)), dim)).astype(np.float32),
                query_width=draw(st.integers(1, 4)), k=draw(st.integers(1, count + 2)),
                rerank=draw(st.integers(0, 3)), aggregation=draw(st.sampled_from(CHOICES["aggregation"])),
                direction=draw(st.sampled_from(["text_to_image", "image_to_text"])))


DTYPES_NP = [np.float32, np.float16, np.float64]


def _save_arrays(folder: str, arrays: dict) -> dict:
    paths = {}
    for name, array in arrays.items():
        paths[name] = os.path.join(folder, f"{name}.npy")
        np.save(paths[name], array)
    return paths


def _index_argv(paths: dict, out: str, **options) -> list:
    argv = ["index", "--embeddings", paths["embeddings"], "--tokens", paths["tokens"], "--out", out]
    for name in ("lengths", "ids"):
        if name in paths:
            argv += [f"--{name}", paths[name]]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", value]
    return argv


@SMALL
@given(gallery=galleries())
def test_index_then_search_in_process_matches_the_library(gallery):
    from aladin_fast.retrieval import Retriever

    rng = np.random.default_rng(0)
    query_tokens = rng.standard_normal((gallery["queries"].shape[0], gallery["query_width"],
                                        gallery["tokens"].shape[2])).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        paths = _save_arrays(folder, {name: gallery[name] for name in ("embeddings", "tokens", "lengths", "ids")})
        paths.update(_save_arrays(folder, {"queries": gallery["queries"], "query_tokens": query_tokens}))
        out = os.path.join(folder, "gallery")
        main = top_cli.main if gallery["rerank"] % 2 else retrieval_cli.main
        code, stderr, stdout = _run_cli(main, _index_argv(paths, out, aggregation=gallery["aggregation"],
                                                         direction=gallery["direction"]))
        assert code == 0, stderr
        rerank_k = gallery["k"] + gallery["rerank"]
        result_path = os.path.join(folder, "result.json")
        code, stderr, stdout = _run_cli(main, [
            "search", "--retriever", out, "--query-embeddings", paths["queries"], "--query-tokens",
            paths["query_tokens"], "--k", str(gallery["k"]), "--rerank-k", str(rerank_k), "--out", result_path])
        assert code == 0, stderr
        with open(result_path) as handle:
            result = json.load(handle)
        ids, scores = Retriever.load(out).search(torch.from_numpy(gallery["queries"]), torch.from_numpy(query_tokens),
                                                 k=gallery["k"], rerank_k=rerank_k)
    assert result["ids"] == ids.tolist() and result["queries"] == gallery["queries"].shape[0]
    # strict JSON: empty slots (-inf) and NaN scores are null
    assert result["scores"] == [[v if math.isfinite(v) else None for v in row] for row in scores.tolist()]
    assert set(ids[ids >= 0].tolist()) <= set(gallery["ids"].tolist())


INDEX_CORRUPTIONS = {
    "embeddings 1-D": lambda a: a.update(embeddings=a["embeddings"][:, 0]),
    "embeddings int": lambda a: a.update(embeddings=a["embeddings"].astype(np.int32)),
    "tokens 2-D": lambda a: a.update(tokens=a["tokens"][:, 0]),
    "tokens count": lambda a: a.update(tokens=np.concatenate([a["tokens"], a["tokens"][:1]])),
    "tokens int": lambda a: a.update(tokens=a["tokens"].astype(np.int64)),
    "lengths too long": lambda a: a.update(lengths=a["lengths"] + a["tokens"].shape[1]),
    "lengths negative": lambda a: a.update(lengths=a["lengths"] - 10),
    "lengths count": lambda a: a.update(lengths=np.concatenate([a["lengths"], [1]])),
    "lengths float": lambda a: a.update(lengths=a["lengths"].astype(np.float32)),
    "lengths 2-D": lambda a: a.update(lengths=a["lengths"][:, None]),
    "ids count": lambda a: a.update(ids=np.concatenate([a["ids"], [10**9]])),
    "ids repeated": lambda a: a.update(ids=np.zeros_like(a["ids"])) if len(a["ids"]) > 1 else a.update(ids=a["ids"][:0]),
    "ids float": lambda a: a.update(ids=a["ids"].astype(np.float64)),
}
INDEX_OPTIONS = {"aggregation": "bogus", "metric": "dot", "store_dtype": "int8", "direction": "both",
                 "padding": "none", "index": "no-such-index"}


@DEFAULT
@given(gallery=galleries(), corruption=st.sampled_from(sorted(INDEX_CORRUPTIONS) + sorted(INDEX_OPTIONS)
                                                       + ["npz", "text file", "missing file", "directory"]),
       top_level=st.booleans())
def test_index_refuses_bad_inputs_with_a_message_and_writes_nothing(gallery, corruption, top_level):
    arrays = {name: gallery[name].copy() for name in ("embeddings", "tokens", "lengths", "ids")}
    options = {}
    if corruption in INDEX_CORRUPTIONS:
        INDEX_CORRUPTIONS[corruption](arrays)
    elif corruption in INDEX_OPTIONS:
        options[corruption] = INDEX_OPTIONS[corruption]
    with tempfile.TemporaryDirectory() as folder:
        paths = _save_arrays(folder, arrays)
        if corruption == "npz":
            np.savez(os.path.join(folder, "e.npz"), a=arrays["embeddings"])
            paths["embeddings"] = os.path.join(folder, "e.npz")
        elif corruption == "text file":
            with open(paths["tokens"], "w") as handle:
                handle.write("not an array")
        elif corruption == "missing file":
            os.remove(paths["lengths"])
        elif corruption == "directory":
            paths["ids"] = folder
        out = os.path.join(folder, "gallery")
        code, stderr, _ = _run_cli(top_cli.main if top_level else retrieval_cli.main, _index_argv(paths, out, **options))
        assert code not in (0, None) and stderr.strip() and "Traceback" not in stderr, (corruption, code, stderr)
        assert not os.path.exists(out), corruption  # nothing written
        if corruption in INDEX_OPTIONS:
            assert f"--{corruption.replace('_', '-')}" in stderr or INDEX_OPTIONS[corruption] in stderr, stderr


@pytest.fixture(scope="module")
def saved_gallery(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cli-gallery"))
    rng = np.random.default_rng(5)
    paths = _save_arrays(folder, {"embeddings": rng.standard_normal((6, 4)).astype(np.float32),
                                  "tokens": rng.standard_normal((6, 3, 5)).astype(np.float32)})
    out = os.path.join(folder, "gallery")
    assert _run_cli(retrieval_cli.main, _index_argv(paths, out))[0] == 0
    return folder, out


SEARCH_CORRUPTIONS = ["k 0", "k -3", "rerank-k 0", "embedding width", "token width", "row count", "lengths count",
                      "lengths too long", "lengths float", "tokens 2-D", "no retriever", "not a retriever",
                      "unwritable out", "k text"]


@SMALL
@given(corruption=st.sampled_from(SEARCH_CORRUPTIONS), queries=st.integers(1, 3), top_level=st.booleans())
def test_search_refuses_bad_inputs_with_a_message(saved_gallery, corruption, queries, top_level):
    """Was: a ValueError / ManifestError / OSError traceback for each of these."""
    folder, gallery = saved_gallery
    rng = np.random.default_rng(queries)
    arrays = {"q": rng.standard_normal((queries, 4)).astype(np.float32),
              "qt": rng.standard_normal((queries, 2, 5)).astype(np.float32), "ql": np.ones(queries, np.int64)}
    if corruption == "embedding width":
        arrays["q"] = arrays["q"][:, :3]
    elif corruption == "token width":
        arrays["qt"] = arrays["qt"][:, :, :4]
    elif corruption == "row count":
        arrays["qt"] = np.concatenate([arrays["qt"], arrays["qt"][:1]])
    elif corruption == "lengths count":
        arrays["ql"] = np.ones(queries + 1, np.int64)
    elif corruption == "lengths too long":
        arrays["ql"] = np.full(queries, 3)
    elif corruption == "lengths float":
        arrays["ql"] = arrays["ql"].astype(np.float32)
    elif corruption == "tokens 2-D":
        arrays["qt"] = arrays["qt"][:, 0]
    with tempfile.TemporaryDirectory() as scratch:
        paths = _save_arrays(scratch, arrays)
        retriever = {"no retriever": os.path.join(scratch, "nothing"), "not a retriever": scratch}.get(corruption, gallery)
        argv = ["search", "--retriever", retriever, "--query-embeddings", paths["q"], "--query-tokens", paths["qt"],
                "--query-lengths", paths["ql"]]
        option = {"k 0": ["--k", "0"], "k -3": ["--k=-3"], "rerank-k 0": ["--rerank-k", "0"], "k text": ["--k", "x"],
                  # a missing folder is created (the write is atomic, session 8); a path below a file cannot be
                  "unwritable out": ["--out", os.path.join(paths["q"], "below-a-file.json")]}
        code, stderr, stdout = _run_cli(top_cli.main if top_level else retrieval_cli.main,
                                        argv + option.get(corruption, []))
    assert code not in (0, None) and stderr.strip() and "Traceback" not in stderr and not stdout, (corruption, stderr)


def test_demo_bad_arguments_exit_2(monkeypatch):
    """Was: '--device bogus' a RuntimeError traceback, '--device cuda' without CUDA a ValueError traceback,
    '--seed -1' a numpy error from the synthetic data, all after the demo had started."""
    def refuse(**kwargs):
        raise AssertionError(f"a bad demo command line started the demo: {kwargs}")
    monkeypatch.setattr("aladin_fast.demo.run_demo", refuse)
    cases = [(["--device", "bogus"], "--device"), (["--device", ""], "--device"), (["--seed=-1"], "--seed"),
             (["--seed", "x"], "--seed")] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA")])
    for flags, message in cases:
        code, stderr, _ = _run_cli(top_cli.main, ["demo", "--quick", *flags])
        assert code == 2 and message in stderr and "Traceback" not in stderr, (flags, stderr)


def test_top_level_command_line_usage_errors():
    for argv in ([], ["bogus"], ["index"], ["search", "--k", "3"], ["train", "--no-such-flag", "1"]):
        code, stderr, _ = _run_cli(top_cli.main, argv)
        assert code == 2 and "usage" in stderr.lower() and "Traceback" not in stderr, (argv, stderr)


# ===================================================================== thorough profiles (-m slow)
@pytest.mark.slow
@THOROUGH
@given(text=st.text(TEXT, max_size=80))
def test_tokenize_keeps_every_letter_and_digit_thorough(text):
    _check_tokens(text)


@pytest.mark.slow
@THOROUGH
@given(case=precomp_splits())
def test_precomp_round_trip_thorough(case):
    _check_precomp(case)


@pytest.mark.slow
@settings(THOROUGH, max_examples=150)
@given(kwargs=scene_settings())
def test_synthetic_scenes_thorough(kwargs):
    _check_scenes(kwargs)


@pytest.mark.slow
@THOROUGH
@given(config=train_configs(), in_file=st.none() | train_configs(), kind=st.sampled_from(FILE_KINDS), data=st.data())
def test_every_flag_round_trips_its_value_thorough(config, in_file, kind, data):
    test_every_flag_round_trips_its_value_over_a_config_file.hypothesis.inner_test(config, in_file, kind, data)
