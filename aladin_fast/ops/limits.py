"""Size limits of the kernels' index arithmetic, checked by the op layer before any launch.

Token offsets are int64 everywhere (``text_offsets`` / ``image_offsets`` and
every ``offset * D`` product in the C++ and Triton kernels), so the token
matrices themselves may hold more than 2^31 elements. What stays 32-bit:

* every backend: sequence lengths are int32 (``TokenBatch.lengths``) and so
  are argmax entries (region / word indices, and the padded length itself in
  ``padding="zero"`` mode): the padded length of either side must be at most
  ``INT32_MAX``;
* Triton (kernels/alignment.py):
  - the 1-D grid must fit CUDA's grid.x limit, ``2^31 - 1`` programs, and
    program ids are int32. A program scores at most 64 pairs (per-pair kernel:
    up to 16 candidates of one caption; packed kernel, kernels/alignment_packed.py:
    up to 8 captions x 8 images), so ``ceil(Nt * K / 64) > 2^31 - 1`` can never
    launch and is refused here; between that and the heuristics' real grid the
    launcher is the one that knows (a grid past the limit fails at launch, it
    does not compute wrong scores);
  - the running argmax uses ``1 << 30`` as its "no winner yet" marker, so a
    region index must stay below it: ``image_pad <= 2^30``; the word / region
    block loops count up to the padded lengths in int32: ``text_pad <= 2^30``;
  - the candidate index ``k_block * BLOCK_K + kk`` is int32: ``K <= 2^31 - 1 - 16``;
  - NaN entries of one pair are counted in an int32: at most
    ``text_pad * image_pad <= 2^31 - 1`` similarities per pair.

Errors name the argument, the size seen and the limit.
"""
from __future__ import annotations

INT32_MAX = (1 << 31) - 1
TRITON_MAX_PAD = 1 << 30           # kernels/alignment.py: _NO_INDEX = 1 << 30
TRITON_MAX_PROGRAMS = INT32_MAX    # CUDA grid.x limit; program ids are int32
TRITON_MAX_BLOCK_K = 16            # largest BLOCK_K of alignment_launch_config (candidates per program)
TRITON_MAX_PAIRS_PER_PROGRAM = 64  # max over both kernels (packed: 8 captions x 8 images)
TRITON_MAX_CANDIDATES = INT32_MAX - TRITON_MAX_BLOCK_K

__all__ = ["check_index_limits", "INT32_MAX", "TRITON_MAX_PAD", "TRITON_MAX_PROGRAMS", "TRITON_MAX_CANDIDATES"]


def _side(name: str) -> tuple[str, str]:
    return ("text_lengths", "words per caption") if name == "text" else ("image_lengths", "regions per image")


def check_index_limits(text, images, num_candidates: int, backend: str) -> None:
    """Raise ``ValueError`` when a size exceeds what ``backend``'s index arithmetic can hold.

    ``text`` / ``images``: :class:`~aladin_fast._inputs.TokenBatch`; ``num_candidates``:
    K (candidates per caption; Ni for all pairs). Python ints only: safe under ``torch.compile``.
    """
    for name, batch in (("text", text), ("images", images)):
        if batch.pad > INT32_MAX:
            lengths, what = _side(name)
            raise ValueError(
                f"{name}: padded length {batch.pad} exceeds {INT32_MAX} (2^31 - 1) {what}: {lengths} and argmax "
                "are int32; split the longest sequences"
            )
    if backend != "triton":
        return
    for name, batch in (("text", text), ("images", images)):
        if batch.pad > TRITON_MAX_PAD:
            _, what = _side(name)
            raise ValueError(
                f"{name}: padded length {batch.pad} exceeds the Triton kernel's limit of {TRITON_MAX_PAD} (2^30) "
                f"{what}; use backend='cpu' or split the sequences"
            )
    if text.pad * images.pad > INT32_MAX:
        raise ValueError(
            f"text and images: {text.pad} x {images.pad} = {text.pad * images.pad} similarities per pair exceeds "
            f"the Triton kernel's int32 limit {INT32_MAX} (2^31 - 1); use backend='cpu'"
        )
    if num_candidates > TRITON_MAX_CANDIDATES:
        raise ValueError(
            f"candidates: K = {num_candidates} per caption exceeds the Triton kernel's limit "
            f"{TRITON_MAX_CANDIDATES} (2^31 - 17); score the candidates in chunks"
        )
    # any launch needs at least ceil(pairs / TRITON_MAX_PAIRS_PER_PROGRAM) programs
    pairs = text.count * num_candidates
    programs = -(-pairs // TRITON_MAX_PAIRS_PER_PROGRAM)
    if programs > TRITON_MAX_PROGRAMS:
        raise ValueError(
            f"text: {text.count} captions x {num_candidates} candidates = {pairs} pairs need at least {programs} "
            f"Triton programs, above the grid limit {TRITON_MAX_PROGRAMS} (2^31 - 1); score the captions in chunks "
            "(e.g. aladin_fast.full_scores)"
        )
