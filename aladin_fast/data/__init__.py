"""Data for training and evaluation: synthetic scenes, precomputed-feature loaders, tokenisation.

* :class:`SyntheticScenes` — deterministic scenes rendered as region features
  with 5 captions each and built-in hard negatives (the demo and test data).
* :class:`PrecompDataset` — the SCAN / VSRN precomputed format and a packed
  token-feature format, memory-mapped; :class:`PrecompCollator` pads batches;
  :func:`save_precomp` writes either layout.
* :class:`Vocabulary` — a word-level :class:`Tokenizer` saved as JSON.
"""
from .precomp import PrecompBatch, PrecompCollator, PrecompDataset, PrecompItem, pad_features, save_precomp
from .synthetic import Change, Scene, SceneObject, SyntheticScenes
from .vocab import Tokenizer, Vocabulary, tokenize

__all__ = [
    "SyntheticScenes", "Scene", "SceneObject", "Change",
    "PrecompDataset", "PrecompItem", "PrecompBatch", "PrecompCollator", "pad_features", "save_precomp",
    "Tokenizer", "Vocabulary", "tokenize",
]
