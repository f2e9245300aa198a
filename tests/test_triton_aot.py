"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90 (no GPU needed).

``kernels.aot_specs()`` lists representative specialisations (fp32 / fp16 / bf16,
all pairs / rerank, TERAN-sized W=32, R=36, D=1024 blocks, multi-block long
sequences).  Each is compiled with ``triton.compile(ASTSource(...), target=GPUTarget(...))``
using the ptxas shipped in the triton wheel; the test checks that 16-bit inputs
reach tensor cores (``mma`` / ``wgmma`` in the PTX) and reads registers and
local memory (spills) of the cubin with the wheel's ``cuobjdump``.

Triton fixes compiled-vs-interpreted when it is first imported (``TRITON_INTERPRET``).
A process started with ``TRITON_INTERPRET=1`` cannot compile, so there this file
runs itself in a child pytest with ``TRITON_INTERPRET=0`` (mirror image of
tests/test_triton_interpreter.py): both files pass in either order in one process.
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest
from triton_modes import load_kernels, run_suite_in_child, triton_interpreted  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHES = (80, 90)
MAX_LOCAL_BYTES = 64  # spill budget per thread (local memory)
# ptxas puts register spills in the stack frame, which cuobjdump reports as STACK (LOCAL stays 0): same budget.
# Known exceptions, measured with triton 3.9 (session 9), held to their current size so that growth fails: the
# fp32 winner GEMM (IEEE fp32 dots: the "dense" strategy's text side, and the fp32 "gather" image side on sm_80)
# and the bf16 packed symm text backward on sm_80. See docs/reliability.md, "Open items".
KNOWN_STACK_BYTES = {
    ("winner_gemm_text_fp32_MwSr", 80): 1696, ("winner_gemm_text_fp32_MwSr", 90): 1128,
    ("winner_gemm_images_fp32_MwSr", 80): 7280,
    ("winner_gemm_text_fp32_MrSw", 80): 9496, ("winner_gemm_text_fp32_MrSw", 90): 216,
    ("winner_gemm_images_fp32_MrSw", 80): 120,
    ("packed_bwd_text_bf16_symm_zero", 80): 344,
}


IN_PROCESS = not triton_interpreted()
# decorating needs no compiler, so the spec list is available in either mode
kernels = load_kernels("_aladin_fast_kernels_compiled", interpret=False)
SPECS = kernels.aot_specs()


def _nvidia_tools():
    """(ptxas path, cuobjdump path) or a reason why the NVIDIA backend cannot compile here."""
    try:
        import triton.backends
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as err:
        return None, f"triton's NVIDIA backend is not importable ({err})"
    if "nvidia" not in triton.backends.backends:
        return None, "triton was built without the NVIDIA backend"
    try:
        ptxas = get_ptxas(80).path
    except Exception as err:  # noqa: BLE001 - any failure to locate ptxas means: cannot test here
        return None, f"ptxas not found ({err})"
    cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    return (ptxas, cuobjdump if os.path.exists(cuobjdump) else None), None


TOOLS, NO_TOOLS = _nvidia_tools() if IN_PROCESS else (None, None)


@pytest.mark.skipif(IN_PROCESS, reason="triton is compiled in this process: the AOT tests run in-process")
def test_aot_suite_in_subprocess():
    run_suite_in_child(__file__, interpret=False)


def _resource_usage(cubin: bytes, cuobjdump: str | None, tmp_path) -> dict:
    """{'REG': registers per thread, 'LOCAL': local-memory bytes (spills), 'STACK': ...} from cuobjdump."""
    if cuobjdump is None:
        return {}
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


@pytest.mark.skipif(not IN_PROCESS, reason="triton is interpreted in this process: runs in a subprocess")
@pytest.mark.parametrize("arch", ARCHES, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_compiles(spec, arch, tmp_path):
    if NO_TOOLS:
        pytest.skip(NO_TOOLS)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, fn, signature, constexprs = spec
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=spec.attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec.options)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"], "no cubin produced"
    tensor_cores = "wgmma" in ptx or re.search(r"\bmma\.sync", ptx) is not None
    usage = _resource_usage(compiled.asm["cubin"], TOOLS[1], tmp_path)
    print(f"{name} sm_{arch}: tensor_cores={tensor_cores} wgmma={'wgmma' in ptx} registers={usage.get('REG')} "
          f"local(spill)_bytes={usage.get('LOCAL')} stack={usage.get('STACK')} "
          f"dynamic_smem={compiled.metadata.shared} num_warps={compiled.metadata.num_warps}")
    if "bf16" in name or "fp16" in name:
        assert tensor_cores, f"{name}: 16-bit dot did not lower to mma/wgmma on sm_{arch}"
    if usage:
        assert usage["LOCAL"] < MAX_LOCAL_BYTES, f"{name} sm_{arch}: {usage['LOCAL']} bytes of local memory (spills)"
        stack_budget = KNOWN_STACK_BYTES.get((name, arch), MAX_LOCAL_BYTES)
        assert usage.get("STACK", 0) <= stack_budget, f"{name} sm_{arch}: {usage['STACK']} bytes of stack (spills)"
        assert usage["REG"] <= 255
    # shared memory must fit the smallest of the targets (A100: 163 KiB per block)
    assert compiled.metadata.shared <= 163 * 1024


def test_specs_are_well_formed():
    """Every spec unpacks as (name, fn, signature, constexprs) and covers the required variants."""
    names = []
    for name, fn, signature, constexprs in SPECS:
        names.append(name)
        assert set(constexprs) <= set(signature) and all(signature[key] == "constexpr" for key in constexprs)
        assert set(signature) == set(fn.arg_names)
    assert len(set(names)) == len(names)
    for required in ("all_pairs_bf16", "all_pairs_fp32", "rerank_bf16", "rerank_fp32", "packed_all_pairs", "packed_bwd"):
        assert any(name.startswith(required) for name in names), required


def test_host_integer_helpers_match_triton():
    """The launchers' ``cdiv`` / ``next_power_of_2`` (kernels/_host.py, no constexpr-function wrapper) equal
    Triton's for every value the launch configurations meet."""
    import triton

    host = load_kernels("_aladin_fast_kernels_compiled", interpret=False)._host
    for n in range(0, 5000):
        assert host.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 36, 64, 128):
            assert host.cdiv(n, d) == triton.cdiv(n, d), (n, d)
