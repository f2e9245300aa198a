"""What the trainer reads: image-caption sources, caption-index datasets and batch collation.

A :class:`PairSource` is any image-caption collection seen through three
things: ``num_images``, ``captions`` (``captions_per_image`` consecutive per
image) and ``image_batch(indices) -> (regions [B, R, F] float32, lengths [B])``.
:func:`as_source` adapts :class:`~aladin_fast.data.SyntheticScenes` (features
rendered per batch, so 10k scenes never need their 2.9 GB feature array) and
:class:`~aladin_fast.data.PrecompDataset` (memory-mapped features with caption
text). One training example is one caption with its image, so an epoch visits
every caption once (VSE++ / TERAN convention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data import PrecompDataset, SyntheticScenes, Tokenizer, Vocabulary, pad_features
from ..data.vocab import pad_ids

__all__ = ["PairSource", "as_source", "CaptionIndexDataset", "TrainBatch", "PairCollator", "build_datasets"]


class PairSource:
    """Images (features fetched by index) and their captions.

    Args:
        num_images: number of images N.
        captions: ``captions_per_image * N`` strings, consecutive per image.
        image_batch: ``fn(indices: list[int]) -> (regions [B, R, F] float32
            array or tensor (zero padding), lengths [B] int)``.
        feature_dim: region feature size F.
        captions_per_image: 5 for COCO / Flickr30k / SyntheticScenes.
    """

    def __init__(self, num_images: int, captions: Sequence[str],
                 image_batch: Callable[[List[int]], Tuple[object, object]], feature_dim: int,
                 captions_per_image: int = 5):
        if len(captions) != captions_per_image * num_images:
            raise ValueError(
                f"captions has {len(captions)} entries for {num_images} images; expected "
                f"captions_per_image * N = {captions_per_image * num_images}"
            )
        self.num_images, self.captions, self.feature_dim = num_images, list(captions), feature_dim
        self.captions_per_image = captions_per_image
        self._image_batch = image_batch

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image_batch(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(regions [B, R, F] float32, lengths [B] int64)`` of images ``indices`` (CPU tensors)."""
        regions, lengths = self._image_batch([int(i) for i in indices])
        regions = torch.as_tensor(regions, dtype=torch.float32)
        return regions, torch.as_tensor(lengths, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"PairSource(images={self.num_images}, captions={self.num_captions}, feature_dim={self.feature_dim})"


def as_source(data) -> PairSource:
    """Adapt ``data`` (SyntheticScenes, PrecompDataset with caption text, or a PairSource) for the trainer."""
    if isinstance(data, PairSource):
        return data
    if isinstance(data, SyntheticScenes):
        def synthetic_batch(indices):
            return data.region_features(indices), data.image_lengths[np.asarray(indices, dtype=np.int64)]

        return PairSource(data.num_images, data.captions, synthetic_batch, data.feature_dim, data.captions_per_image)
    if isinstance(data, PrecompDataset):
        if data.captions is None:
            raise ValueError(
                f"data ({data!r}) has word features but no caption text; the trainer tokenises captions itself"
            )

        def precomp_batch(indices):
            return pad_features([data.image(i) for i in indices])

        return PairSource(data.num_images, data.captions, precomp_batch, data.feature_dim, data.captions_per_image)
    raise TypeError(
        f"data must be a SyntheticScenes, PrecompDataset or PairSource, got {type(data).__name__}"
    )


class CaptionIndexDataset(torch.utils.data.Dataset):
    """Caption indices for one epoch (the sampler shuffles and shards the positions).

    By default item ``k`` is caption ``k`` (every caption once per epoch). With
    ``one_per_image`` item ``k`` is one caption of image ``k``, drawn anew each
    epoch from ``(seed, epoch)`` (call :meth:`set_epoch`), so a batch never
    holds one image twice and an epoch is ``captions_per_image`` times shorter.
    """

    def __init__(self, num_images: int, captions_per_image: int, one_per_image: bool = False, seed: int = 0):
        self.num_images, self.captions_per_image = num_images, captions_per_image
        self.one_per_image, self.seed = one_per_image, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        generator = np.random.default_rng([self.seed, epoch, 0xCA9])
        self._choice = generator.integers(0, self.captions_per_image, size=self.num_images) if self.one_per_image else None

    def __len__(self) -> int:
        return self.num_images if self.one_per_image else self.num_images * self.captions_per_image

    def __getitem__(self, index: int) -> int:
        if self._choice is None:
            return int(index)
        return int(index) * self.captions_per_image + int(self._choice[index])


@dataclass
class TrainBatch:
    """B captions with their images.

    ``regions [B, R, F]`` float32 and ``image_lengths [B]``; ``captions [B, L]``
    int64 token ids with ``caption_lengths [B]``; ``image_indices`` /
    ``caption_indices`` ``[B]`` int64 (two captions of one image give equal
    ``image_indices``: they are not each other's negatives).
    """

    regions: torch.Tensor
    image_lengths: torch.Tensor
    captions: torch.Tensor
    caption_lengths: torch.Tensor
    image_indices: torch.Tensor
    caption_indices: torch.Tensor

    def to(self, device) -> "TrainBatch":
        return TrainBatch(*(getattr(self, name).to(device, non_blocking=True) for name in self.__dataclass_fields__))

    def __len__(self) -> int:
        return int(self.captions.shape[0])


class PairCollator:
    """``collate_fn``: caption indices -> :class:`TrainBatch` (fetches image features, tokenises captions).

    With ``fetch_regions=False`` the batch carries no region features
    (``regions [B, 0, F]``, ``image_lengths`` zeros): for a student stage that
    reads the teacher's cached tokens by index instead.
    """

    def __init__(self, source: PairSource, tokenizer: Tokenizer, fetch_regions: bool = True):
        self.source, self.tokenizer, self.fetch_regions = source, tokenizer, fetch_regions

    def __call__(self, caption_indices: Sequence[int]) -> TrainBatch:
        caption_indices = [int(j) for j in caption_indices]
        image_indices = [j // self.source.captions_per_image for j in caption_indices]
        if self.fetch_regions:
            regions, image_lengths = self.source.image_batch(image_indices)
        else:
            regions = torch.zeros(len(image_indices), 0, self.source.feature_dim)
            image_lengths = torch.zeros(len(image_indices), dtype=torch.int64)
        ids, lengths = pad_ids([self.tokenizer.encode(self.source.captions[j]) for j in caption_indices],
                               self.tokenizer.pad_id)
        return TrainBatch(regions, image_lengths, ids, lengths, torch.tensor(image_indices, dtype=torch.int64),
                          torch.tensor(caption_indices, dtype=torch.int64))


def encode_captions(tokenizer: Tokenizer, captions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[N, L]`` int64 and lengths ``[N]`` of ``captions``."""
    return pad_ids([tokenizer.encode(c) for c in captions], tokenizer.pad_id)


def build_datasets(config) -> Tuple[object, Optional[object]]:
    """``(train, val)`` datasets described by a :class:`~aladin_fast.training.TrainConfig`'s data fields."""
    if config.data == "synthetic":
        common = dict(feature_dim=config.synthetic_feature_dim, world_seed=config.synthetic_seed)
        train = SyntheticScenes(config.synthetic_train_images, seed=2 * config.synthetic_seed, **common)
        val = SyntheticScenes(config.synthetic_val_images, seed=2 * config.synthetic_seed + 1, **common)
        return train, val
    train = PrecompDataset(config.data_root, config.train_split)
    val = PrecompDataset(config.data_root, config.val_split) if config.val_split else None
    return train, val


def build_vocabulary(source: PairSource, min_count: int = 1) -> Vocabulary:
    """Word-level vocabulary of the training captions."""
    return Vocabulary.build(source.captions, min_count=min_count)
