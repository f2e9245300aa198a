"""Property test of the Triton backend, forward and backward, in the interpreter: random shapes, lengths, modes,
paddings, aggregations, dtypes, backward strategies and kernel families on grid-valued tokens (exact fp32 sums,
frequent ties) vs the float64 reference -- scores, winners and gradients (tests/test_fuzz.py, ``_grid_check``).

Same process arrangement as tests/test_triton_interpreter.py: in-process under ``TRITON_INTERPRET=1``,
otherwise one child pytest runs this file interpreted. The interpreter runs every program in Python, so
the default run draws a small derandomized sample; ``-m slow`` a larger random one.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fuzz import COMMON, grid_problems, _grid_check
from triton_modes import run_suite_in_child, triton_interpreted

from aladin_fast.ops.alignment_op import TRITON_BACKWARD_STRATEGIES

IN_PROCESS = triton_interpreted()
pytestmark = pytest.mark.interpreter
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton is compiled in this process: the suite runs in a "
                                "TRITON_INTERPRET=1 subprocess (test_triton_fuzz_in_subprocess)")


@pytest.mark.skipif(IN_PROCESS, reason="triton is interpreted in this process: the suite runs in-process")
def test_triton_fuzz_in_subprocess():
    run_suite_in_child(__file__, interpret=True)


@st.composite
def triton_problems(draw):
    problem = draw(grid_problems())
    problem["env"] = {"ALADIN_FAST_TRITON_BACKWARD": draw(st.sampled_from(TRITON_BACKWARD_STRATEGIES)),
                      "ALADIN_FAST_TRITON_KERNEL": draw(st.sampled_from(["pair", "packed"]))}
    return problem


def _check(problem):
    # the interpreter converts fp32 -> bf16 by truncation (triton/runtime/interpreter.py, cast_impl: no rounding
    # mode), compiled Triton rounds to nearest: a bf16 gradient here may be off by up to one unit in the last place
    _grid_check(problem, backend="triton", env=problem["env"], bf16_ulps=1.0)


@in_process
@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=COMMON["suppress_health_check"])
@given(problem=triton_problems())
def test_triton_backend_exact_on_a_grid(problem):
    _check(problem)


@pytest.mark.slow
@in_process
@settings(max_examples=400, **COMMON)
@given(problem=triton_problems())
def test_triton_backend_exact_on_a_grid_thorough(problem):
    _check(problem)
