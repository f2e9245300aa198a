"""Synthetic "scenes": image-text data where fine-grained alignment really matters.

Each image is a scene of 3-6 objects (a noun plus colour, size and material) on a
3 x 3 grid, with a few spatial relations between them. It is rendered as region
features, the way a bottom-up detector would see it: every object gives 1-3
regions whose feature is a sum of fixed random *concept prototypes* (object +
attributes + a weak location code) plus noise, and background regions (sky,
grass, ...) fill the image up to a variable number of regions (at most
``regions``). Five captions per image come from a small grammar that mentions a
random subset of the objects, attributes and relations, with synonyms and varied
word order.

Hard negatives are built in: scenes come in groups of ``group_size`` that share
one base layout; every scene but the first changes exactly one thing (one
object's colour, size, material or noun), and captions mention that difference
most of the time ("a red cube left of a small sphere" vs "a blue cube ...").
A pooled global embedding blurs such one-word differences; the word-region
max of MrSw sees them. Attribute values repeat across the objects of a scene
(2 sizes, 8 colours, 5 materials for 3-6 objects), so "small" or "red" alone
rarely tells a scene from its variant: what does is which object carries it
("a small cube"), i.e. matching each noun phrase to one region. Scoring
bag-of-words concepts (no binding) does not get this; contextual word tokens
can. :meth:`SyntheticScenes.oracle_phrase_features` is that binding-aware
oracle (see the acceptance measurements in ``docs/training.md``).

Two worlds are separate: ``world_seed`` fixes the prototypes, the word
embeddings and the noise bank (share it between train and test splits),
``seed`` fixes the scenes, captions and noise draws. Everything is deterministic.
"""
from __future__ import annotations

import functools
import numbers
import random
import re
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .vocab import tokenize

__all__ = ["SceneObject", "Change", "Scene", "SyntheticScenes", "OBJECTS", "COLOURS", "SIZES", "MATERIALS"]

# concept -> surface words (the first is canonical); synonyms share one prototype
OBJECTS: Dict[str, Tuple[str, ...]] = {
    "dog": ("dog", "puppy"), "cat": ("cat", "kitten"), "car": ("car", "automobile"),
    "bicycle": ("bicycle", "bike"), "chair": ("chair", "seat"), "table": ("table", "desk"),
    "lamp": ("lamp", "light"), "cup": ("cup", "mug"), "bottle": ("bottle", "flask"),
    "book": ("book", "novel"), "ball": ("ball", "sphere"), "box": ("box", "crate"),
    "tree": ("tree",), "bench": ("bench",), "umbrella": ("umbrella", "parasol"),
    "clock": ("clock",), "vase": ("vase", "pot"), "boat": ("boat", "ship"),
    "horse": ("horse", "pony"), "bird": ("bird",), "kite": ("kite",), "bag": ("bag", "backpack"),
    "hat": ("hat", "cap"), "shoe": ("shoe", "sneaker"),
}
COLOURS: Dict[str, Tuple[str, ...]] = {
    "red": ("red", "crimson"), "blue": ("blue",), "green": ("green",), "yellow": ("yellow",),
    "white": ("white",), "black": ("black", "dark"), "orange": ("orange",), "purple": ("purple", "violet"),
}
SIZES: Dict[str, Tuple[str, ...]] = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
MATERIALS: Dict[str, Tuple[str, ...]] = {
    "wooden": ("wooden", "wood"), "metal": ("metal", "metallic"), "plastic": ("plastic",),
    "glass": ("glass",), "rubber": ("rubber",),
}
MATERIAL_NOUNS = {"wooden": "wood", "metal": "metal", "plastic": "plastic", "glass": "glass", "rubber": "rubber"}
BACKGROUNDS = ("sky", "grass", "wall", "floor", "road", "water", "sand", "snow")
LOCATIONS = tuple(f"cell{row}{col}" for row in range(3) for col in range(3))  # grid cells, never named in text
ATTRIBUTES = {"colour": COLOURS, "size": SIZES, "material": MATERIALS}

# relation -> phrases; "inverse" gives the phrase with subject and object swapped
RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
FUNCTION_WORDS = (
    "a", "an", "the", "one", "there", "is", "are", "in", "of", "and", "with", "that", "which", "made",
    "photo", "picture", "scene", "image", "showing", "to", "on", "some", "next", "it", "see", "can", "we",
) + tuple(word for phrases in RELATION_PHRASES.values() for phrase in phrases for word in phrase.split())

NOISE_BANK_ROWS = 2048
CONCEPTS_PER_REGION = 5  # noun, colour, size, material, location (background regions: 1)
_VOWEL_AFTER_A = re.compile(r"\ba ([aeiou])")


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: concept names (keys of OBJECTS / COLOURS / SIZES / MATERIALS) and grid cell."""

    noun: str
    colour: str
    size: str
    material: str
    cell: Tuple[int, int]  # (row, col) in the 3 x 3 grid; distinct per scene


@dataclass(frozen=True)
class Change:
    """What makes a hard-negative variant differ from its group's base scene."""

    kind: str  # "colour" | "size" | "material" | "noun"
    object_index: int
    old: str
    new: str


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image.

    ``relations`` are ``(subject_index, relation, object_index)`` with relation
    in ``left of / right of / above / below``, true for the objects' cells.
    ``object_regions[k]`` is how many regions object k yields; ``background``
    names the background regions. ``change`` is None for a group's base scene.
    """

    objects: Tuple[SceneObject, ...]
    relations: Tuple[Tuple[int, str, int], ...]
    object_regions: Tuple[int, ...]
    background: Tuple[str, ...]
    group: int
    change: Optional[Change]

    @property
    def num_regions(self) -> int:
        return sum(self.object_regions) + len(self.background)


@functools.lru_cache(maxsize=4)
def _world(world_seed: int, feature_dim: int):
    """Concept names, unit prototypes [K, D] float32, noise bank [NOISE_BANK_ROWS, D] and word vectors."""
    rng = np.random.default_rng([world_seed, 0x5CE7E5])
    names = (list(OBJECTS) + list(COLOURS) + list(SIZES) + list(MATERIALS) + list(BACKGROUNDS) + list(LOCATIONS))
    prototypes = rng.standard_normal((len(names), feature_dim), dtype=np.float32)
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    bank = rng.standard_normal((NOISE_BANK_ROWS, feature_dim), dtype=np.float32)
    concept_of_word = {}
    for table in (OBJECTS, COLOURS, SIZES, MATERIALS):
        for concept, words in table.items():
            for word in words:
                concept_of_word[word] = concept
    words = sorted(set(concept_of_word) | set(FUNCTION_WORDS))
    own = rng.standard_normal((len(words), feature_dim), dtype=np.float32)
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    index = {name: k for k, name in enumerate(names)}
    word_vectors = {}
    for row, word in enumerate(words):
        if word in concept_of_word:  # synonyms: the concept's prototype plus a little of their own
            vector = prototypes[index[concept_of_word[word]]] + 0.3 * own[row]
        else:
            vector = own[row]
        word_vectors[word] = (vector / np.linalg.norm(vector)).astype(np.float32)
    return tuple(names), index, prototypes, bank, concept_of_word, word_vectors


class SyntheticScenes:
    """A deterministic synthetic image-text dataset with hard-negative groups.

    Args:
        num_images: number of scenes (images); captions are ``5 * num_images``.
        seed: scenes, captions and noise draws.
        regions: padded region count R (max regions per image).
        feature_dim: region / word feature size D.
        group_size: scenes per hard-negative group (1 disables hard negatives).
        noise: norm of the Gaussian noise added to every region feature
            (prototypes are unit vectors; per-component std = noise / sqrt(D)).
        min_regions: fewest valid regions per image (default: regions // 3).
        diagnostic_prob: probability that a caption of a scene with a group
            difference mentions it.
        world_seed: prototypes, word embeddings and noise bank (keep it fixed
            across splits so that train and test share one world).

    Attributes:
        scenes: ``list[Scene]`` ground truth, one per image.
        captions: ``list[str]``, 5 consecutive per image.
        caption_objects: ``list[tuple[int, ...]]``, objects each caption mentions.
        caption_phrases: ``list[tuple[tuple[str, ...], ...]]``, per caption its noun
            phrases as concept names (noun first, then the attributes the caption gives it).
        image_lengths: ``[N]`` int64 numpy array of valid regions.
        groups: ``[N]`` int64 numpy array of hard-negative group ids.
        image_features: ``[N, R, D]`` float32 numpy array (built on first use,
            zero padding); :meth:`region_features` builds a subset.

    Cost: scenes and captions are built eagerly (10k images in a few seconds);
    region features lazily, about 1-2 ms per image at D = 2048 (10k images are
    2.9 GB: build subsets with :meth:`region_features` when that is too much).
    """

    captions_per_image = 5

    def __init__(
        self,
        num_images: int,
        seed: int = 0,
        regions: int = 36,
        feature_dim: int = 2048,
        *,
        group_size: int = 4,
        noise: float = 1.0,
        min_regions: Optional[int] = None,
        diagnostic_prob: float = 0.8,
        world_seed: int = 0,
    ):
        if not isinstance(num_images, int) or num_images < 0:
            raise ValueError(f"num_images must be a non-negative int, got {num_images!r}")
        if not isinstance(regions, int) or regions < 19:
            raise ValueError(f"regions must be an int >= 19 (6 objects x 3 regions + background), got {regions!r}")
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        min_regions = regions // 3 if min_regions is None else min_regions
        if not isinstance(min_regions, int) or not 1 <= min_regions <= regions:
            raise ValueError(f"min_regions must be an int in [1, regions={regions}], got {min_regions!r}")
        if not 0 <= noise < float("inf") or not 0.0 <= diagnostic_prob <= 1.0:  # NaN / inf noise: NaN features
            raise ValueError(f"need finite noise >= 0 and diagnostic_prob in [0, 1], got {noise!r}, {diagnostic_prob!r}")
        for name, value in (("seed", seed), ("world_seed", world_seed)):  # numpy seeds must be non-negative ints
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.num_images, self.seed, self.regions, self.feature_dim = num_images, seed, regions, feature_dim
        self.group_size, self.noise, self.min_regions = group_size, float(noise), min_regions
        self.diagnostic_prob, self.world_seed = diagnostic_prob, world_seed
        rng = random.Random(f"aladin_fast.scenes/{seed}")
        self.scenes: List[Scene] = []
        while len(self.scenes) < num_images:
            group = len(self.scenes) // group_size
            self.scenes.extend(self._group(rng, group)[: num_images - len(self.scenes)])
        group_changes: Dict[int, List[Change]] = {}
        for scene in self.scenes:
            if scene.change is not None:
                group_changes.setdefault(scene.group, []).append(scene.change)
        self.captions: List[str] = []
        self.caption_objects: List[Tuple[int, ...]] = []
        self.caption_phrases: List[Tuple[Tuple[str, ...], ...]] = []
        for scene in self.scenes:
            # what tells this scene from its group mates: its own change, or (for a base) all its variants'
            diagnostic = [scene.change] if scene.change is not None else group_changes.get(scene.group, [])
            for _ in range(self.captions_per_image):
                text, mentioned, phrases = self._caption(rng, scene, diagnostic)
                self.captions.append(text)
                self.caption_objects.append(mentioned)
                self.caption_phrases.append(phrases)
        self.image_lengths = np.array([scene.num_regions for scene in self.scenes], dtype=np.int64)
        self.groups = np.array([scene.group for scene in self.scenes], dtype=np.int64)
        self._image_features: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ scenes
    def _random_object(self, rng: random.Random, cell, exclude_nouns=()) -> SceneObject:
        noun = rng.choice([n for n in OBJECTS if n not in exclude_nouns])
        return SceneObject(noun, rng.choice(list(COLOURS)), rng.choice(list(SIZES)), rng.choice(list(MATERIALS)), cell)

    def _group(self, rng: random.Random, group: int) -> List[Scene]:
        """A base scene and ``group_size - 1`` variants that each change one thing."""
        count = rng.randint(3, 6)
        cells = rng.sample([(r, c) for r in range(3) for c in range(3)], count)
        objects: List[SceneObject] = []
        for cell in cells:
            objects.append(self._random_object(rng, cell, exclude_nouns={o.noun for o in objects}))
        pairs = rng.sample([(a, b) for a in range(count) for b in range(count) if a < b], min(3, count - 1))
        relations = tuple((a, _relation(objects[a].cell, objects[b].cell), b) for a, b in pairs)
        object_regions = tuple(rng.choice((1, 1, 2, 2, 3)) for _ in objects)
        total = rng.randint(max(self.min_regions, sum(object_regions) + 1), self.regions)
        background = tuple(rng.choice(BACKGROUNDS) for _ in range(total - sum(object_regions)))
        base = Scene(tuple(objects), relations, object_regions, background, group, None)
        scenes = [base]
        for _ in range(self.group_size - 1):
            index = rng.randrange(count)
            old_object = objects[index]
            kind = rng.choice(("colour", "size", "material", "noun"))
            if kind == "noun":
                taken = {o.noun for o in objects}
                new = rng.choice([n for n in OBJECTS if n not in taken])
            else:
                values = ATTRIBUTES[kind]
                new = rng.choice([v for v in values if v != getattr(old_object, kind)])
            changed = list(objects)
            changed[index] = replace(old_object, **{kind: new})
            change = Change(kind, index, getattr(old_object, kind), new)
            scenes.append(replace(base, objects=tuple(changed), change=change))
        return scenes

    # ---------------------------------------------------------------- captions
    def _noun_phrase(self, rng: random.Random, obj: SceneObject, force: Optional[str]) -> Tuple[str, Tuple[str, ...]]:
        """"a small red cube", "a cube that is red", "a red cube made of metal", ... and its concepts (noun first)."""
        kinds = [k for k in ("size", "colour", "material") if k == force or rng.random() < 0.6]
        words = {k: rng.choice(ATTRIBUTES[k][getattr(obj, k)]) for k in kinds}
        concepts = (obj.noun, *(getattr(obj, k) for k in kinds))
        noun = rng.choice(OBJECTS[obj.noun])
        style = rng.random()
        if "material" in words and style < 0.3:
            prefix = " ".join(words[k] for k in ("size", "colour") if k in words)
            return f"a {prefix + ' ' if prefix else ''}{noun} made of {MATERIAL_NOUNS[obj.material]}", concepts
        if words and style > 0.75:
            last = rng.choice(list(words))
            prefix = " ".join(words[k] for k in ("size", "colour", "material") if k in words and k != last)
            return f"a {prefix + ' ' if prefix else ''}{noun} that is {words[last]}", concepts
        adjectives = " ".join(words[k] for k in ("size", "colour", "material") if k in words)
        return f"a {adjectives + ' ' if adjectives else ''}{noun}", concepts

    def _caption(self, rng: random.Random, scene: Scene, diagnostic: List[Change]
                 ) -> Tuple[str, Tuple[int, ...], Tuple[Tuple[str, ...], ...]]:
        """One caption, the indices of the objects it mentions and their noun phrases' concepts."""
        focus, force = None, {}
        if diagnostic and rng.random() < self.diagnostic_prob:
            change = rng.choice(diagnostic)
            focus = change.object_index
            force[focus] = None if change.kind == "noun" else change.kind
        style = rng.random()
        count = len(scene.objects)
        relations = [r for r in scene.relations if focus is None or focus in (r[0], r[2])]
        if relations and style < 0.5:  # two objects and a relation
            subject, relation, obj = rng.choice(relations)
            a, a_concepts = self._noun_phrase(rng, scene.objects[subject], force.get(subject))
            b, b_concepts = self._noun_phrase(rng, scene.objects[obj], force.get(obj))
            if rng.random() < 0.5:
                subject, obj, a, b, relation = obj, subject, b, a, INVERSE_RELATION[relation]
                a_concepts, b_concepts = b_concepts, a_concepts
            phrase = rng.choice(RELATION_PHRASES[relation])
            template = rng.choice(("{a} {p} {b}", "there is {a} {p} {b}", "{a} is {p} {b}", "a photo of {a} {p} {b}"))
            return _articles(template.format(a=a, p=phrase, b=b)), (subject, obj), (a_concepts, b_concepts)
        mentioned = rng.sample(range(count), rng.choice((1, 2, 2, 3, 3)))
        if focus is not None and focus not in mentioned:
            mentioned[0] = focus
        built = [self._noun_phrase(rng, scene.objects[k], force.get(k)) for k in mentioned]
        phrases = [text for text, _ in built]
        listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        template = rng.choice(("{l}", "a picture of {l}", "there is {l} in the scene", "we can see {l}", "an image showing {l}"))
        return _articles(template.format(l=listed)), tuple(mentioned), tuple(concepts for _, concepts in built)

    # ---------------------------------------------------------------- features
    @property
    def concept_names(self) -> Tuple[str, ...]:
        """Names of the K concepts (objects, colours, sizes, materials, backgrounds, grid cells)."""
        return _world(self.world_seed, self.feature_dim)[0]

    @property
    def concept_prototypes(self) -> np.ndarray:
        """``[K, D]`` float32 unit prototypes; ``features @ concept_prototypes.T`` is the oracle projection.

        A copy: the cached world is shared by every dataset of this ``world_seed`` in the process, so an in-place
        edit of a shared array would change the features of every dataset built after it."""
        return _world(self.world_seed, self.feature_dim)[2].copy()

    def _region_coefficients(self, scene: Scene, rng: np.random.Generator) -> np.ndarray:
        """``[R, K]`` float32 mixing weights of concept prototypes for each region (zero rows = padding)."""
        index = _world(self.world_seed, self.feature_dim)[1]
        weights = np.zeros((self.regions, len(index)), dtype=np.float32)
        rows, columns, values = [], [], []
        object_rows = sum(scene.object_regions)
        jitter = rng.uniform(0.7, 1.0, size=(object_rows, 3))  # attribute strength varies per region
        row = 0
        for obj, parts in zip(scene.objects, scene.object_regions):
            location = index[LOCATIONS[3 * obj.cell[0] + obj.cell[1]]]
            attributes = (index[obj.colour], index[obj.size], index[obj.material])
            for part in range(parts):
                # the first region is the whole object; the others are partial views (weaker attributes)
                strength = 1.0 if part == 0 else 0.6
                rows += [row] * 5
                columns += [index[obj.noun], *attributes, location]
                values += [1.0, *(strength * jitter[row]), 0.5]
                row += 1
        for name in scene.background:
            rows.append(row)
            columns.append(index[name])
            values.append(1.0)
            row += 1
        order = rng.permutation(row)  # detector order carries no meaning
        weights[order[rows], columns] = values
        return weights

    def region_features(self, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        """Region features ``[len(indices), R, D]`` float32 (all images if None); zero padding.

        Deterministic per image: image ``i`` gets the same features whatever
        subset it is built in.
        """
        indices = range(self.num_images) if indices is None else [int(i) for i in indices]
        _, _, prototypes, bank, _, _ = _world(self.world_seed, self.feature_dim)
        out = np.empty((len(indices), self.regions, self.feature_dim), dtype=np.float32)
        scale = np.float32(self.noise / np.sqrt(2.0 * self.feature_dim))
        chunk = 64  # images per matmul: one [chunk * R, K] @ [K, D] product instead of many tiny ones
        for first in range(0, len(indices), chunk):
            block = indices[first:first + chunk]
            coefficients = np.empty((len(block), self.regions, prototypes.shape[0]), dtype=np.float32)
            picks = []
            for slot, i in enumerate(block):
                if not 0 <= i < self.num_images:
                    raise IndexError(f"image index {i} out of range for {self.num_images} images")
                rng = np.random.default_rng([self.world_seed, self.seed, i])
                coefficients[slot] = self._region_coefficients(self.scenes[i], rng)
                # noise: sum of two rows of a fixed Gaussian bank (4M combinations), much cheaper than fresh draws
                picks.append(rng.integers(0, NOISE_BANK_ROWS, size=(2, self.scenes[i].num_regions)))
            features = out[first:first + len(block)]
            # a region mixes at most CONCEPTS_PER_REGION prototypes: add them in one fixed order (ascending
            # concept) with elementwise float32 operations. Not one BLAS product: its rounding depends on where
            # a row falls in the [chunk * R, K] matrix, so an image's features changed with the other images
            flat = coefficients.reshape(-1, coefficients.shape[-1])
            assert np.count_nonzero(flat, axis=1).max(initial=0) <= CONCEPTS_PER_REGION
            columns = np.argsort(flat == 0, axis=1, kind="stable")[:, :CONCEPTS_PER_REGION]
            weights = np.take_along_axis(flat, columns, axis=1)
            rows = features.reshape(-1, self.feature_dim)
            rows[:] = 0.0
            for part in range(CONCEPTS_PER_REGION):
                used = np.flatnonzero(weights[:, part])  # padding rows, and backgrounds after one part, stop
                rows[used] += weights[used, part, None] * prototypes[columns[used, part]]
            for slot, (i, pick) in enumerate(zip(block, picks)):
                features[slot, : pick.shape[1]] += (bank[pick[0]] + bank[pick[1]]) * scale
        return out

    @property
    def image_features(self) -> np.ndarray:
        """``[N, R, D]`` float32 region features of every image (cached)."""
        if self._image_features is None:
            self._image_features = self.region_features()
        return self._image_features

    def word_features(
        self, caption_indices: Optional[Sequence[int]] = None, noise: float = 0.5
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """An untrained "text encoder": a fixed embedding per word plus noise.

        Content words embed near their concept's prototype (synonyms share it),
        so ``alignment_scores(words, regions, normalize=True)`` already carries
        signal without training. Returns ``(features [Nc, W, D] float32,
        lengths [Nc] int64)``, zero padding, W = longest caption.
        """
        indices = range(len(self.captions)) if caption_indices is None else [int(j) for j in caption_indices]
        word_vectors = _world(self.world_seed, self.feature_dim)[5]
        tokens = [tokenize(self.captions[j]) for j in indices]
        width = max((len(t) for t in tokens), default=0)
        out = np.zeros((len(tokens), width, self.feature_dim), dtype=np.float32)
        for slot, (j, words) in enumerate(zip(indices, tokens)):
            rng = np.random.default_rng([self.world_seed, self.seed, 1 << 40, j])
            out[slot, : len(words)] = np.stack([word_vectors[w] for w in words])
            out[slot, : len(words)] += rng.standard_normal((len(words), self.feature_dim), dtype=np.float32) * np.float32(
                noise / np.sqrt(self.feature_dim)
            )
        lengths = torch.tensor([len(t) for t in tokens], dtype=torch.int64)
        return torch.from_numpy(out), lengths

    def oracle_word_features(self, caption_indices: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Content words as one-hot concept vectors: ``([Nc, W, K] float32, lengths [Nc])``.

        Function words are dropped. Paired with ``region_features @
        concept_prototypes.T`` this is the alignment a perfect encoder could learn.
        """
        names, index, _, _, concept_of_word, _ = _world(self.world_seed, self.feature_dim)
        indices = range(len(self.captions)) if caption_indices is None else [int(j) for j in caption_indices]
        concepts = [[index[concept_of_word[w]] for w in tokenize(self.captions[j]) if w in concept_of_word] for j in indices]
        width = max((len(c) for c in concepts), default=0)
        out = torch.zeros(len(concepts), width, len(names))
        for slot, row in enumerate(concepts):
            out[slot, torch.arange(len(row)), torch.tensor(row, dtype=torch.int64)] = 1.0
        return out, torch.tensor([len(c) for c in concepts], dtype=torch.int64)

    def oracle_phrase_features(self, caption_indices: Optional[Sequence[int]] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Noun phrases as concept vectors: ``([Nc, P, K] float32, lengths [Nc])``, zero padding.

        One token per noun phrase of the caption, the mean of one-hot vectors of
        its noun and the attributes the caption gives it ("a small red cube" ->
        (cube + small + red) / 3: components summing to 1, not a unit L2 norm).
        With ``region_features @ concept_prototypes.T`` and MrSw each phrase
        must find one region carrying all of its concepts:
        the binding a contextual word encoder can learn and a bag of words
        (:meth:`oracle_word_features`) cannot.
        """
        names, index, _, _, _, _ = _world(self.world_seed, self.feature_dim)
        indices = range(len(self.captions)) if caption_indices is None else [int(j) for j in caption_indices]
        phrases = [self.caption_phrases[j] for j in indices]
        width = max((len(p) for p in phrases), default=0)
        out = torch.zeros(len(phrases), width, len(names))
        for slot, caption in enumerate(phrases):
            for position, concepts in enumerate(caption):
                out[slot, position, [index[c] for c in concepts]] = 1.0 / len(concepts)
        return out, torch.tensor([len(p) for p in phrases], dtype=torch.int64)

    # ------------------------------------------------------------ ground truth
    def hard_negative_pairs(self) -> List[Tuple[int, int, Change]]:
        """``(base_image, variant_image, change)`` for every variant: two images one change apart."""
        pairs = []
        for i, scene in enumerate(self.scenes):
            if scene.change is not None:
                base = i - 1
                while self.scenes[base].change is not None:
                    base -= 1
                pairs.append((base, i, scene.change))
        return pairs

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (
            f"SyntheticScenes(num_images={self.num_images}, seed={self.seed}, regions={self.regions}, "
            f"feature_dim={self.feature_dim}, group_size={self.group_size}, noise={self.noise})"
        )


def _relation(a: Tuple[int, int], b: Tuple[int, int]) -> str:
    """Spatial relation of cell ``a`` (subject) to cell ``b``: horizontal offset first."""
    if a[1] != b[1]:
        return "left of" if a[1] < b[1] else "right of"
    return "above" if a[0] < b[0] else "below"


def _articles(text: str) -> str:
    """"a orange cup" -> "an orange cup"."""
    return _VOWEL_AFTER_A.sub(r"an \1", text)
