"""Triton picks interpreter or compiler mode per process: helpers for test modules that need one of them.

Triton reads TRITON_INTERPRET at its first import (for its own tl.* helpers) and
again at each @triton.jit decoration; interpreted and compiled kernels cannot be
mixed in one process. Test modules therefore load a private copy of kernels/
decorated in the mode they need, and rerun themselves in a child process when
this process is in the other mode.
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def triton_interpreted() -> bool:
    """Whether this process's triton runs kernels in the interpreter (decided at its first import)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.cdiv, InterpretedFunction)


def load_kernels(alias: str, interpret: bool):
    """Import kernels/ as a private package whose @triton.jit kernels match ``interpret``.

    A private copy: ``aladin_fast.kernels`` needs an installed package, and another
    module may already hold a copy decorated in the other mode.
    """
    if alias in sys.modules:
        return sys.modules[alias]
    kernels_dir = os.path.join(ROOT, "kernels")
    spec = importlib.util.spec_from_file_location(alias, os.path.join(kernels_dir, "__init__.py"),
                                                  submodule_search_locations=[kernels_dir])
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    sys.modules[alias] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[alias]
        raise
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module


def thin(values, keep: int = 1):
    """Parametrize values with all but the first ``keep`` marked ``slow``: the Triton interpreter runs
    each case in Python, so the default run takes a representative sample and ``-m slow`` the rest
    (a child interpreter run inherits the marker expression through ALADIN_FAST_PYTEST_MARKERS)."""
    import pytest

    out = []
    for index, value in enumerate(values):
        args = value if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple) else (value, )
        out.append(value if index < keep else pytest.param(*args, marks=pytest.mark.slow))
    return out


def run_suite_in_child(path: str, interpret: bool, timeout: int = 1200) -> None:
    """Run one test file in a child pytest whose triton is in the other mode; fail with its output tail.

    The child keeps the default marker expression (or ALADIN_FAST_PYTEST_MARKERS, e.g. "slow or not slow").
    """
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    command = [sys.executable, "-m", "pytest", os.path.abspath(path), "-q", "-p", "no:cacheprovider",
               "--rootdir", ROOT, "-m", os.environ.get("ALADIN_FAST_PYTEST_MARKERS", "not slow")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    print(output[-3000:])
    assert result.returncode == 0, f"{os.path.basename(path)} failed in a child (exit {result.returncode}):\n" \
                                   f"{output[-12000:]}"
