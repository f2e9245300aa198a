"""Request parsing and validation: JSON bodies -> typed queries, or a :class:`RequestError` naming the field.

Tensor fields (``query_embedding``, ``query_tokens``, ``candidate_tokens``)
accept either nested JSON lists of numbers or a base64 object, which is far
cheaper to parse for big inputs::

    {"dtype": "float32" | "float16" | "bfloat16", "shape": [L, D], "data": "<base64, little-endian, C order>"}

``POST /search`` body::

    {"query_embedding": [E], "query_tokens": [L, D], "query_length": int (default L),
     "k": 10, "rerank_k": 100, "direction": "text_to_image", "explain": false}

``POST /rerank`` body (exactly one of ``candidate_ids`` / ``candidate_tokens``)::

    {"query_tokens": [L, D], "query_length": int, "direction": ...,
     "candidate_ids": [K]  |  "candidate_tokens": [K, R, D], "candidate_lengths": [K] (default R)}

Validation only reads the gallery snapshot it is given (dims, ids), so a
request validated against one snapshot is always served by that snapshot.
"""
from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
from typing import Any, Optional

import numpy as np
import torch

from .config import ServingConfig
from .engine import Gallery, RerankQuery, SearchQuery

__all__ = ["RequestError", "parse_json_body", "parse_search", "parse_rerank", "decode_tensor", "encode_tensor"]

_WIRE_DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
                "bfloat16": (np.int16, torch.bfloat16)}  # bfloat16 travels as raw 16-bit words
_SEARCH_FIELDS = {"query_embedding", "query_tokens", "query_length", "k", "rerank_k", "direction", "explain"}
_RERANK_FIELDS = {"query_tokens", "query_length", "direction", "candidate_ids", "candidate_tokens",
                  "candidate_lengths"}


class RequestError(ValueError):
    """A client error: HTTP ``status`` with a JSON body naming ``field``."""

    MAX_MESSAGE = 500  # messages quote the rejected value: never echo a whole request body back

    def __init__(self, field: str, message: str, status: int = 422):
        if len(message) > self.MAX_MESSAGE:
            message = message[: self.MAX_MESSAGE - 20] + f" ... ({len(message)} chars)"
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def body(self) -> dict:
        return {"error": {"type": "invalid_request", "field": self.field, "message": self.message}}


def parse_json_body(raw: bytes) -> dict:
    """The body as a JSON object (400 naming ``body`` otherwise)."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError("body", f"not valid JSON ({err})", status=400) from None
    except RecursionError:  # e.g. 100k nested '[': not a ValueError, was a 500
        raise RequestError("body", "not valid JSON (nested too deeply)", status=400) from None
    if not isinstance(value, dict):
        raise RequestError("body", f"must be a JSON object, got {type(value).__name__}", status=400)
    return value


def encode_tensor(tensor: torch.Tensor, dtype: str = "float32") -> dict:
    """The base64 wire form of ``tensor`` (what clients send for big tensor fields)."""
    torch_dtype = _WIRE_DTYPES[dtype][1]
    data = tensor.detach().to("cpu", torch_dtype).contiguous()
    if dtype == "bfloat16":
        data = data.view(torch.int16)
    return {"dtype": dtype, "shape": list(tensor.shape), "data": base64.b64encode(data.numpy().tobytes()).decode()}


def decode_tensor(field: str, value: Any, ndim: int) -> torch.Tensor:
    """A finite float tensor with ``ndim`` dims from nested lists or the base64 form (float32 for lists)."""
    if isinstance(value, dict):
        unknown = set(value) - {"dtype", "shape", "data"}
        if unknown:
            raise RequestError(field, f"base64 tensor takes keys dtype, shape, data; got unknown {sorted(unknown)}")
        dtype = value.get("dtype", "float32")
        if dtype not in _WIRE_DTYPES:
            raise RequestError(field, f"dtype must be one of {sorted(_WIRE_DTYPES)}, got {dtype!r}")
        shape = value.get("shape")
        if (not isinstance(shape, list) or len(shape) != ndim
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise RequestError(field, f"shape must be a list of {ndim} non-negative ints, got {shape!r}")
        if not isinstance(value.get("data"), str):
            raise RequestError(field, "data must be a base64 string")
        try:
            raw = base64.b64decode(value["data"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(field, f"data is not valid base64 ({err})") from None
        numpy_dtype, torch_dtype = _WIRE_DTYPES[dtype]
        expected = math.prod(shape) * np.dtype(numpy_dtype).itemsize  # exact: np.prod wraps around in int64
        if len(raw) != expected:
            raise RequestError(field, f"data holds {len(raw)} bytes but shape {shape} in {dtype} needs {expected}")
        try:  # an empty tensor with a huge dim, e.g. [0, 2**63], passes the size check
            tensor = torch.from_numpy(np.frombuffer(raw, dtype=numpy_dtype).copy().reshape(shape))
        except ValueError as err:
            raise RequestError(field, f"shape {shape} is not a valid tensor shape ({err})") from None
        if dtype == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
    elif isinstance(value, list):
        try:
            array = np.asarray(value, dtype=np.float32)
        except (ValueError, TypeError):
            raise RequestError(field, f"must be a rectangular {ndim}-d list of numbers") from None
        if array.ndim != ndim:
            raise RequestError(field, f"must be a {ndim}-d list of numbers, got {array.ndim}-d with shape "
                                      f"{list(array.shape)}")
        leaves = value
        for _ in range(ndim - 1):  # rectangular ndim-d lists (numpy said so): flatten to the leaves
            leaves = itertools.chain.from_iterable(leaves)
        odd = set(map(type, leaves)) - {int, float}  # numpy also reads "1.5" and true as numbers
        if odd:
            raise RequestError(field, f"must hold numbers only, got {sorted(kind.__name__ for kind in odd)}")
        tensor = torch.from_numpy(array)
    else:
        raise RequestError(field, f"must be a {ndim}-d list of numbers or a base64 tensor object, "
                                  f"got {type(value).__name__}")
    if not bool(torch.isfinite(tensor).all()):
        raise RequestError(field, "contains NaN or infinity")
    return tensor


def _int_field(body: dict, field: str, default: Optional[int], minimum: int, maximum: int) -> int:
    value = body.get(field, default)
    if value is None:
        raise RequestError(field, "is required")
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(field, f"must be an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise RequestError(field, f"must be in [{minimum}, {maximum}], got {value}")
    return value


def _check_fields(body: dict, allowed: set) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(unknown[0], f"unknown field (allowed: {sorted(allowed)})")


def _direction(body: dict, gallery: Gallery) -> str:
    direction = body.get("direction", gallery.default_direction)
    if not isinstance(direction, str) or direction not in gallery.retrievers:  # a list / dict is unhashable
        raise RequestError("direction", f"must be one of the loaded directions {sorted(gallery.retrievers)}, "
                                        f"got {direction!r}")
    return direction


def _query_tokens(body: dict, dim: int, config: ServingConfig):
    if "query_tokens" not in body:
        raise RequestError("query_tokens", "is required")
    tokens = decode_tensor("query_tokens", body["query_tokens"], 2)
    width, token_dim = tokens.shape
    if token_dim != dim:
        raise RequestError("query_tokens", f"must have shape [L, {dim}] (the gallery's token dim), "
                                           f"got {list(tokens.shape)}")
    if not 1 <= width <= config.max_query_tokens:
        raise RequestError("query_tokens", f"must hold 1..{config.max_query_tokens} tokens, got {width}")
    length = _int_field(body, "query_length", width, 1, width)
    return tokens, length


def parse_search(body: dict, gallery: Gallery, config: ServingConfig) -> SearchQuery:
    """A validated :class:`SearchQuery` bound to ``gallery`` (RequestError names the bad field)."""
    _check_fields(body, _SEARCH_FIELDS)
    direction = _direction(body, gallery)
    retriever = gallery.retrievers[direction]
    if "query_embedding" not in body:
        raise RequestError("query_embedding", "is required")
    embedding = decode_tensor("query_embedding", body["query_embedding"], 1)
    if embedding.shape[0] != retriever.student_index.dim:
        raise RequestError("query_embedding", f"must have shape [{retriever.student_index.dim}] (the student "
                                              f"index dim), got {list(embedding.shape)}")
    tokens, length = _query_tokens(body, retriever.feature_store.dim, config)
    k = _int_field(body, "k", 10, 1, config.max_k)
    rerank_k = _int_field(body, "rerank_k", max(100, k), 1, config.max_rerank_k)
    if rerank_k < k:
        raise RequestError("rerank_k", f"must be >= k (= {k}), got {rerank_k}")
    explain = body.get("explain", False)
    if not isinstance(explain, bool):
        raise RequestError("explain", f"must be true or false, got {explain!r}")
    return SearchQuery(gallery, direction, embedding.float().numpy()[None, :], tokens, length, k, rerank_k, explain)


def parse_rerank(body: dict, gallery: Gallery, config: ServingConfig) -> RerankQuery:
    """A validated :class:`RerankQuery` bound to ``gallery`` (RequestError names the bad field)."""
    _check_fields(body, _RERANK_FIELDS)
    direction = _direction(body, gallery)
    store = gallery.retrievers[direction].feature_store
    tokens, length = _query_tokens(body, store.dim, config)
    has_ids, has_tokens = "candidate_ids" in body, "candidate_tokens" in body
    if has_ids == has_tokens:
        raise RequestError("candidate_ids", "give exactly one of candidate_ids or candidate_tokens")
    if has_ids:
        if "candidate_lengths" in body:
            raise RequestError("candidate_lengths", "only goes with candidate_tokens")
        raw = body["candidate_ids"]
        if isinstance(raw, list) and len(raw) > config.max_candidates:  # before looking at each id
            raise RequestError("candidate_ids", f"at most {config.max_candidates} candidates, got {len(raw)}")
        if (not isinstance(raw, list) or not raw
                or not all(isinstance(item, int) and not isinstance(item, bool) for item in raw)):
            raise RequestError("candidate_ids", "must be a non-empty list of int ids")
        if any(not -(1 << 63) <= item < (1 << 63) for item in raw):
            raise RequestError("candidate_ids", "ids must fit in int64")
        ids = np.asarray(raw, dtype=np.int64)
        missing = np.unique(ids[~store.contains(ids)])
        if missing.size:
            raise RequestError("candidate_ids", f"not in the {direction} gallery: {missing[:8].tolist()}"
                                                f"{' ...' if missing.size > 8 else ''}", status=404)
        return RerankQuery(gallery, direction, tokens, length, candidate_ids=ids)
    candidates = decode_tensor("candidate_tokens", body["candidate_tokens"], 3)
    count, width, token_dim = candidates.shape
    if token_dim != store.dim:
        raise RequestError("candidate_tokens", f"must have shape [K, R, {store.dim}], got {list(candidates.shape)}")
    if not 1 <= count <= config.max_candidates:
        raise RequestError("candidate_tokens", f"must hold 1..{config.max_candidates} candidates, got {count}")
    if not 1 <= width <= config.max_candidate_tokens:
        raise RequestError("candidate_tokens", f"must hold 1..{config.max_candidate_tokens} tokens per candidate, "
                                               f"got {width}")
    lengths_raw = body.get("candidate_lengths", [width] * count)
    if (not isinstance(lengths_raw, list) or len(lengths_raw) != count
            or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= width for n in lengths_raw)):
        raise RequestError("candidate_lengths", f"must be a list of {count} ints in [1, {width}]")
    lengths = torch.tensor(lengths_raw, dtype=torch.int64)
    return RerankQuery(gallery, direction, tokens, length, candidate_tokens=candidates, candidate_lengths=lengths)
