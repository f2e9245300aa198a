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
