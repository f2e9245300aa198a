"""Loaders for precomputed features: the SCAN precomp format and a packed token-feature format.

Layout ``"scan"`` (the SCAN / VSRN ``*_precomp`` releases), files in ``root``:

* ``{split}_ims.npy``: ``[N, R, D]`` region features (memory-mapped; any float
  dtype, float16 included), or a directory ``{split}_ims/`` of per-image
  ``[R_i, D]`` ``.npy`` files (variable region counts: ``image_lengths``), taken
  in name order (numeric order when every file stem is a decimal integer);
* ``{split}_caps.txt``: one caption per line (UTF-8, an optional BOM and CRLF
  line ends are dropped), ``captions_per_image`` (5) consecutive lines per image.

SCAN's ``im_div`` rule: when ``{split}_ims.npy`` has as many rows as the split
has captions (images repeated once per caption), caption ``j`` is paired with
row ``j`` and image ``i`` is row ``i * captions_per_image`` (as SCAN's and VSE++'s
evaluation take ``img_embs[::5]``). Not read: VSE++ global features
``[N, D]`` (refused; save ``x[:, None]`` for one region per image) and TERAN's
``features_36/bu_att/*.npz`` + COCO JSON captions (convert them to this layout).

Layout ``"tokens"`` (variable-length tokens packed like ``cu_seqlens``), files
in ``root/{split}/``:

* ``regions.npy`` ``[total_regions, D]`` and ``region_offsets.npy`` ``[N + 1]``
  (image i owns rows ``offsets[i]:offsets[i + 1]``);
* ``captions.txt`` and/or ``words.npy`` ``[total_words, D]`` +
  ``word_offsets.npy`` ``[N_captions + 1]`` (precomputed word features).

Every ``.npy`` is opened with ``mmap_mode="r"``: nothing is read until an item
is asked for. :func:`save_precomp` writes both layouts.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .vocab import Tokenizer, pad_ids

__all__ = ["PrecompDataset", "PrecompItem", "PrecompBatch", "PrecompCollator", "pad_features", "save_precomp"]

LAYOUTS = ("auto", "scan", "tokens")
WRITE_BLOCK_BYTES = 8 << 20  # bytes of rows written per step by the streaming .npy writers (bounds their memory)
PathLike = Union[str, "os.PathLike[str]"]


class PrecompItem(NamedTuple):
    """One caption with its image: ``image`` ``[R_i, D]`` (memory-mapped view), ``caption``
    (``str``, or ``[W_j, D]`` word features when the split has no caption text), ``image_index``."""

    image: np.ndarray
    caption: Union[str, np.ndarray]
    image_index: int


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {what}: {path}")
    return path


def _read_captions(path: str) -> List[str]:
    """One caption per line: lines end at "\n" (a "\r" before it is dropped: CRLF files; a UTF-8 BOM
    at the start of the file is dropped too). Not
    ``str.splitlines``: it also breaks at \v, \f, \x1c-\x1e, \x85, \u2028 and \u2029, which scraped
    captions can hold, and would shift every later caption onto the wrong image."""
    with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: a leading BOM is not caption text
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":  # the final line break ends the last caption
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _check_offsets(offsets: np.ndarray, count: int, total: int, name: str, path: str) -> np.ndarray:
    """Validate cu_seqlens-style offsets ``[count + 1]`` covering ``total`` rows; return them as int64."""
    if offsets.ndim != 1 or offsets.shape[0] != count + 1:
        raise ValueError(f"{name} ({path}) must have shape [{count + 1}], got {tuple(offsets.shape)}")
    if not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{name} ({path}) must be integers, got dtype {offsets.dtype}")
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"{name} ({path}) must start at 0, never decrease and end at the row count {total}; "
            f"got first {offsets[0]}, last {offsets[-1]}"
        )
    return offsets


def _npy_shape(path: str) -> Tuple[int, ...]:
    """Shape of a ``.npy`` file without reading its data (memory-map, read the header)."""
    try:
        return tuple(np.load(path, mmap_mode="r").shape)
    except ValueError as error:
        raise ValueError(f"cannot read {path} as a .npy array: {error}") from None


class PrecompDataset(torch.utils.data.Dataset):
    """Captions paired with their image's precomputed region features.

    Args:
        root: folder holding the split (see the module docstring for layouts).
        split: ``"train"``, ``"dev"``, ``"test"``, ... (file-name prefix).
        layout: ``"scan"``, ``"tokens"`` or ``"auto"`` (whichever exists).
        captions_per_image: consecutive captions per image (5).

    ``len(dataset)`` is the number of captions; ``dataset[j]`` is a
    :class:`PrecompItem` for caption ``j`` and image ``j // captions_per_image``
    (with an image array of one row per caption, SCAN's ``im_div = 1``, the item
    holds row ``j`` and :meth:`image` ``i`` is row ``i * captions_per_image``).
    Attributes: ``num_images``, ``num_captions``, ``feature_dim``,
    ``image_lengths`` ``[N]`` int64, ``captions`` (``list[str]`` or None), ``layout``.
    """

    def __init__(self, root: PathLike, split: str, layout: str = "auto", captions_per_image: int = 5):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if not isinstance(captions_per_image, int) or captions_per_image < 1:
            raise ValueError(f"captions_per_image must be a positive int, got {captions_per_image!r}")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"precomp root folder not found: {root}")
        self.root, self.split, self.captions_per_image = root, split, captions_per_image
        scan_array = os.path.join(root, f"{split}_ims.npy")
        scan_folder = os.path.join(root, f"{split}_ims")
        tokens_folder = os.path.join(root, split)
        if layout == "auto":
            if os.path.exists(scan_array) or os.path.isdir(scan_folder):
                layout = "scan"
            elif os.path.isfile(os.path.join(tokens_folder, "regions.npy")):
                layout = "tokens"
            else:
                raise FileNotFoundError(
                    f"no precomputed split {split!r} in {root}: expected {scan_array} or {scan_folder}/ "
                    f"(scan layout) or {os.path.join(tokens_folder, 'regions.npy')} (tokens layout)"
                )
        self.layout = layout
        self._images: Optional[np.ndarray] = None  # [N, R, D] (scan array)
        self._image_files: Optional[List[str]] = None  # per-image files (scan folder)
        self._regions: Optional[np.ndarray] = None  # [total, D] (tokens)
        self._region_offsets: Optional[np.ndarray] = None
        self._words: Optional[np.ndarray] = None
        self._word_offsets: Optional[np.ndarray] = None
        self.captions: Optional[List[str]] = None
        self._row_stride = 1  # rows of the image array per image: captions_per_image under SCAN's im_div = 1
        if layout == "scan":
            self._open_scan(scan_array, scan_folder)
            captions_path = os.path.join(root, f"{split}_caps.txt")
            self.captions = _read_captions(_require_file(captions_path, "captions file"))
            rows = len(self.image_lengths)
            if self._images is not None and captions_per_image > 1 and len(self.captions) == rows > 0 \
                    and rows % captions_per_image == 0:
                # SCAN's im_div = 1: one (repeated) image row per caption; image i is row i * captions_per_image
                self._row_stride = captions_per_image
                self.image_lengths = self.image_lengths[::captions_per_image].copy()
                warnings.warn(
                    f"{scan_array} has one row per caption ({rows}): read as SCAN's repeated-image layout (im_div = 1, "
                    f"image i = row {captions_per_image} * i); if the split really has one caption per image, pass "
                    f"captions_per_image=1", stacklevel=2)
            self._check_caption_count(len(self.captions), captions_path,
                                      scan_array if self._images is not None else scan_folder + "/")
        else:
            self._open_tokens(tokens_folder)

    # ----------------------------------------------------------------- opening
    def _open_scan(self, array_path: str, folder: str) -> None:
        if os.path.isfile(array_path):
            images = np.load(array_path, mmap_mode="r")
            if images.ndim == 2:
                raise ValueError(
                    f"{array_path} must be [N_images, R, D], got shape {tuple(images.shape)}: one global vector per "
                    f"image (VSE++ precomp), not region features; save it as [N, 1, D] (x[:, None]) to use each "
                    f"vector as one region")
            if images.ndim != 3:
                raise ValueError(f"{array_path} must be [N_images, R, D], got shape {tuple(images.shape)}")
            self._images = images
            self.image_lengths = np.full(images.shape[0], images.shape[1], dtype=np.int64)
            self.feature_dim = int(images.shape[2])
            return
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"missing image features: neither {array_path} nor folder {folder}/ exists")
        entries = os.listdir(folder)
        names = [name for name in entries if name.endswith(".npy")]
        if not names:
            hint = ""
            if any(name.endswith(".npz") for name in entries):
                hint = (" (it holds .npz archives, e.g. TERAN's bottom-up bu_att/*.npz: they are not read; save each "
                        "image's [R_i, D] region features as <index>.npy)")
            raise FileNotFoundError(f"image feature folder {folder}/ holds no .npy files{hint}")
        stems = [name[:-4] for name in names]
        if all(stem.isdecimal() for stem in stems):  # not isdigit(): int() refuses "²"
            names = [name for _, name in sorted(zip((int(s) for s in stems), names))]
        else:
            names.sort()
        self._image_files = [os.path.join(folder, name) for name in names]
        lengths, dims = [], set()
        for path in self._image_files:
            shape = _npy_shape(path)
            if len(shape) != 2:
                raise ValueError(f"per-image features must be [R_i, D]; {path} has shape {shape}")
            lengths.append(shape[0])
            dims.add(shape[1])
        if len(dims) != 1:
            raise ValueError(f"per-image features in {folder}/ disagree on D: found {sorted(dims)}")
        self.image_lengths = np.array(lengths, dtype=np.int64)
        self.feature_dim = dims.pop()

    def _open_tokens(self, folder: str) -> None:
        regions_path = _require_file(os.path.join(folder, "regions.npy"), "region features")
        offsets_path = _require_file(os.path.join(folder, "region_offsets.npy"), "region offsets")
        regions = np.load(regions_path, mmap_mode="r")
        if regions.ndim != 2:
            raise ValueError(f"{regions_path} must be [total_regions, D], got shape {tuple(regions.shape)}")
        offsets = np.load(offsets_path, mmap_mode="r")
        count = offsets.shape[0] - 1 if offsets.ndim == 1 else -1
        self._region_offsets = _check_offsets(offsets, count, regions.shape[0], "region_offsets", offsets_path)
        self._regions = regions
        self.image_lengths = np.diff(self._region_offsets)
        self.feature_dim = int(regions.shape[1])
        captions_path = os.path.join(folder, "captions.txt")
        words_path, word_offsets_path = os.path.join(folder, "words.npy"), os.path.join(folder, "word_offsets.npy")
        if os.path.isfile(captions_path):
            self.captions = _read_captions(captions_path)
            self._check_caption_count(len(self.captions), captions_path)
        if os.path.isfile(words_path) or os.path.isfile(word_offsets_path):
            words = np.load(_require_file(words_path, "word features"), mmap_mode="r")
            if words.ndim != 2:
                raise ValueError(f"{words_path} must be [total_words, D], got shape {tuple(words.shape)}")
            offsets = np.load(_require_file(word_offsets_path, "word offsets"), mmap_mode="r")
            count = offsets.shape[0] - 1 if offsets.ndim == 1 else -1
            self._check_caption_count(count, word_offsets_path)
            self._word_offsets = _check_offsets(offsets, count, words.shape[0], "word_offsets", word_offsets_path)
            self._words = words
        elif self.captions is None:
            raise FileNotFoundError(
                f"missing captions: {captions_path} or {words_path} + {word_offsets_path} (tokens layout)"
            )

    def _check_caption_count(self, count: int, path: str, images_path: Optional[str] = None) -> None:
        expected = self.captions_per_image * len(self.image_lengths)
        if count != expected:
            source = f" (images: {images_path})" if images_path else ""
            trailing = 0
            if self.captions is not None and path.endswith(".txt") and count == len(self.captions):
                while trailing < count and self.captions[count - 1 - trailing].strip() == "":
                    trailing += 1
            hint = f" (the file ends with {trailing} empty line(s))" if trailing else ""
            raise ValueError(
                f"{path} has {count} captions for {len(self.image_lengths)} images; expected "
                f"captions_per_image * N_images = {self.captions_per_image} * {len(self.image_lengths)} = {expected}"
                f"{hint}{source}"
            )

    # ------------------------------------------------------------------ access
    @property
    def num_images(self) -> int:
        return len(self.image_lengths)

    @property
    def num_captions(self) -> int:
        return self.captions_per_image * self.num_images

    def __len__(self) -> int:
        return self.num_captions

    def image(self, index: int) -> np.ndarray:
        """Region features ``[R_i, D]`` of image ``index`` (a memory-mapped view; copy before writing)."""
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"image index {index} out of range for {self.num_images} images")
        index %= self.num_images
        if self._images is not None:
            return self._images[index * self._row_stride]
        if self._image_files is not None:
            features = np.load(self._image_files[index], mmap_mode="r")
            if features.ndim != 2 or features.shape[1] != self.feature_dim:
                raise ValueError(f"{self._image_files[index]} changed shape: {tuple(features.shape)}")
            return features
        return self._regions[self._region_offsets[index]:self._region_offsets[index + 1]]

    def word_features(self, index: int) -> np.ndarray:
        """Word features ``[W_j, D]`` of caption ``index`` (tokens layout with ``words.npy`` only)."""
        if self._words is None:
            raise ValueError(f"split {self.split!r} in {self.root} has no word features (words.npy)")
        if not -self.num_captions <= index < self.num_captions:
            raise IndexError(f"caption index {index} out of range for {self.num_captions} captions")
        index %= self.num_captions
        return self._words[self._word_offsets[index]:self._word_offsets[index + 1]]

    def __getitem__(self, index: int) -> PrecompItem:
        if not -len(self) <= index < len(self):
            raise IndexError(f"caption index {index} out of range for {len(self)} captions")
        index %= len(self)
        image_index = index // self.captions_per_image
        caption = self.captions[index] if self.captions is not None else self.word_features(index)
        if self._row_stride > 1:  # SCAN's im_div = 1: caption j reads row j
            return PrecompItem(self._images[index], caption, image_index)
        return PrecompItem(self.image(image_index), caption, image_index)

    def __repr__(self) -> str:
        return (
            f"PrecompDataset(root={self.root!r}, split={self.split!r}, layout={self.layout!r}, "
            f"images={self.num_images}, captions={self.num_captions}, D={self.feature_dim})"
        )


def pad_features(arrays: Sequence[np.ndarray], dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``[L_i, D]`` arrays into ``[B, max L_i, D]`` of ``dtype``; also return ``lengths [B]`` int64."""
    if not arrays:
        raise ValueError("arrays must hold at least one [L_i, D] array")
    if any(np.ndim(a) != 2 for a in arrays) or len({int(a.shape[-1]) for a in arrays}) != 1:
        raise ValueError(f"arrays must all be [L_i, D] with one D; got shapes {[tuple(a.shape) for a in arrays]}")
    lengths = torch.tensor([a.shape[0] for a in arrays], dtype=torch.int64)
    # fill through numpy: reads memory-mapped (read-only) arrays without torch's non-writable warning
    out = np.zeros((len(arrays), int(lengths.max()), int(arrays[0].shape[-1])), dtype=np.float32)
    for row, array in enumerate(arrays):
        out[row, : array.shape[0]] = array
    return torch.from_numpy(out).to(dtype), lengths


@dataclass
class PrecompBatch:
    """A collated batch of B captions and their images.

    ``images [B, R, D]`` (zero padding) with ``image_lengths [B]`` and
    ``image_indices [B]`` (int64); ``texts`` (``list[str]`` or None); with a
    tokenizer, ``tokens [B, L]`` int64 (pad id) and ``token_lengths [B]``; for
    word-feature splits, ``words [B, W, D]`` and ``word_lengths [B]``.
    """

    images: torch.Tensor
    image_lengths: torch.Tensor
    image_indices: torch.Tensor
    texts: Optional[List[str]] = None
    tokens: Optional[torch.Tensor] = None
    token_lengths: Optional[torch.Tensor] = None
    words: Optional[torch.Tensor] = None
    word_lengths: Optional[torch.Tensor] = None


class PrecompCollator:
    """``collate_fn`` for a DataLoader over :class:`PrecompDataset` (picklable, so workers can use it).

    Args:
        tokenizer: a :class:`~aladin_fast.data.vocab.Tokenizer` (e.g. a
            Vocabulary); captions are encoded with ``<bos>``/``<eos>``. None
            keeps only the raw ``texts``.
        dtype: feature dtype of the padded tensors (float32 by default).
    """

    def __init__(self, tokenizer: Optional[Tokenizer] = None, dtype: torch.dtype = torch.float32):
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must implement encode/decode/pad_id/__len__, got {type(tokenizer).__name__}")
        self.tokenizer, self.dtype = tokenizer, dtype

    def __call__(self, items: Sequence[PrecompItem]) -> PrecompBatch:
        images, image_lengths = pad_features([item.image for item in items], self.dtype)
        batch = PrecompBatch(images, image_lengths, torch.tensor([item.image_index for item in items], dtype=torch.int64))
        captions = [item.caption for item in items]
        if all(isinstance(c, str) for c in captions):
            batch.texts = list(captions)
            if self.tokenizer is not None:
                ids = [self.tokenizer.encode(c) for c in captions]
                batch.tokens, batch.token_lengths = pad_ids(ids, self.tokenizer.pad_id)
        else:
            batch.words, batch.word_lengths = pad_features(captions, self.dtype)
        return batch


def save_precomp(
    root: PathLike,
    split: str,
    image_features: np.ndarray,
    captions: Optional[Sequence[str]] = None,
    *,
    image_lengths: Optional[Sequence[int]] = None,
    word_features: Optional[Tuple[np.ndarray, Sequence[int]]] = None,
    layout: str = "scan",
) -> None:
    """Write a split that :class:`PrecompDataset` reads back.

    Args:
        image_features: ``[N, R, D]`` (padded; float32 or float16).
        captions: ``5 * N`` strings (required for ``"scan"``).
        image_lengths: ``[N]`` valid regions (``"tokens"`` packs only those;
            default all R). The scan layout has no lengths: it refuses any below R.
        word_features: ``(features [Nc, W, D], lengths [Nc])`` for ``"tokens"``
            (the scan layout refuses them).
        layout: ``"scan"`` or ``"tokens"``.
    """
    if layout not in ("scan", "tokens"):
        raise ValueError(f"layout must be 'scan' or 'tokens', got {layout!r}")
    image_features = np.asarray(image_features)
    if image_features.ndim != 3:
        raise ValueError(f"image_features must be [N, R, D], got shape {tuple(image_features.shape)}")
    root = os.fspath(root)
    count, width = image_features.shape[:2]
    lengths = np.full(count, width, dtype=np.int64) if image_lengths is None else _lengths(image_lengths)
    if lengths is None or lengths.shape != (count,) or np.any(lengths < 0) or np.any(lengths > width):
        raise ValueError(f"image_lengths must be [{count}] integers in [0, {width}], got {image_lengths!r}")
    if layout == "scan":
        if captions is None:
            raise ValueError("captions are required for the scan layout")
        if word_features is not None:
            raise ValueError("the scan layout cannot hold word_features (they would be lost): use layout='tokens'")
        if np.any(lengths < width):
            raise ValueError(f"the scan layout stores all R={width} regions of every image (no lengths): "
                             "image_lengths below R would turn padding into regions; use layout='tokens'")
        os.makedirs(root, exist_ok=True)
        np.save(os.path.join(root, f"{split}_ims.npy"), image_features)
        _write_lines(os.path.join(root, f"{split}_caps.txt"), captions)
        return
    words = word_lengths = None
    if word_features is not None:
        words, word_lengths = np.asarray(word_features[0]), _lengths(word_features[1])
        if words.ndim != 3 or word_lengths is None or word_lengths.shape != words.shape[:1] \
                or np.any(word_lengths < 0) or np.any(word_lengths > words.shape[1]):
            raise ValueError(f"word_features must be (features [Nc, W, D], lengths [Nc] integers in [0, W]), got "
                             f"features of shape {tuple(words.shape)} and lengths {word_features[1]!r}")
    folder = os.path.join(root, split)
    os.makedirs(folder, exist_ok=True)
    _save_valid_rows(os.path.join(folder, "regions.npy"), image_features, lengths)
    np.save(os.path.join(folder, "region_offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    if captions is not None:
        _write_lines(os.path.join(folder, "captions.txt"), captions)
    if words is not None:
        _save_valid_rows(os.path.join(folder, "words.npy"), words, word_lengths)
        np.save(os.path.join(folder, "word_offsets.npy"), np.concatenate([[0], np.cumsum(word_lengths)]).astype(np.int64))


def write_npy_rows(handle, dtype, shape: Sequence[int], blocks) -> bool:
    """Write a C-order ``.npy`` array of ``shape`` to the open binary file ``handle`` from ``blocks``, its
    consecutive row blocks (an iterable, consumed only here), byte for byte what ``np.save(handle,
    np.concatenate(blocks))`` writes -- without ever holding the whole array (a gathered or packed copy of a
    memory-mapped gallery can be larger than RAM).

    Returns False, having written nothing, for a dtype whose header needs a ``.npy`` format above 1.0 (or
    holds Python objects): the caller then saves the array in one piece."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        return False
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": tuple(int(size) for size in shape)}
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, header)  # what np.save picks whenever version 1.0 can hold it
    except (ValueError, UnicodeEncodeError):
        return False
    handle.write(buffer.getvalue())
    for block in blocks:
        block = np.ascontiguousarray(block, dtype=dtype)
        if block.size:
            handle.write(block.reshape(-1).view(np.uint8).data)
    return True


def _save_valid_rows(path: str, features: np.ndarray, lengths: np.ndarray) -> None:
    """``np.save(path, features[valid])`` (the first ``lengths[i]`` rows of every ``features[i]``), written in
    blocks of items: the packed copy of the whole split is never built."""
    count, width = features.shape[:2]
    row_bytes = max(1, width * int(np.prod(features.shape[2:], dtype=np.int64)) * features.dtype.itemsize)
    step = max(1, WRITE_BLOCK_BYTES // row_bytes)

    def blocks():
        for start in range(0, count, step):
            part = lengths[start:start + step]
            yield features[start:start + step][np.arange(width)[None, :] < part[:, None]]

    with open(path, "wb") as handle:
        if write_npy_rows(handle, features.dtype, (int(lengths.sum()),) + features.shape[2:], blocks()):
            return
    np.save(path, features[np.arange(width)[None, :] < lengths[:, None]])


def _lengths(values) -> Optional[np.ndarray]:
    """``values`` as int64 when every one is a whole number (an empty list too), else None."""
    array = np.asarray(values)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.number) or array.size == 0):
        return None
    if not np.issubdtype(array.dtype, np.integer) and not np.all(np.isfinite(array) & (array == np.round(array))):
        return None
    return array.astype(np.int64)


def _write_lines(path: str, lines: Sequence[str]) -> None:
    for line in lines:
        if "\n" in line or "\r" in line:
            raise ValueError(f"captions must not contain line breaks, got {line!r}")
    # no BOM, unless the first caption starts with U+FEFF itself: the reader drops one leading BOM
    encoding = "utf-8-sig" if lines and lines[0].startswith("\ufeff") else "utf-8"
    with open(path, "w", encoding=encoding) as handle:
        handle.writelines(f"{line}\n" for line in lines)  # streamed: no second copy of every caption
