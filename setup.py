"""Build script for aladin-fast.

Does not import torch and does not inspect the build machine's CPU: the C++
extension carries AVX-512, AVX2 and scalar code paths (per-function target
attributes) and picks one at run time.
"""
import os
import sys

from setuptools import find_packages, setup
from setuptools.errors import BaseError, CCompilerError, ExecError, PlatformError

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pragma: no cover - pyproject.toml lists pybind11 as a build requirement
    sys.exit("pybind11 is required to build aladin-fast (pip install pybind11)")

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_version():
    about = {}
    with open(os.path.join(HERE, "aladin_fast", "_version.py")) as handle:
        exec(handle.read(), about)
    return about["__version__"]


class AtomicBuildExt(build_ext):
    """``build_ext`` whose in-place copy of the built extension (``--inplace``, ``make``) writes a new file and
    renames it over the old one: overwriting the old file in place changed the pages of every running process
    that had it mapped (a test run or a server during a rebuild crashed in the kernel). A failed compile says
    what the build needs (it was a bare "[Errno 2] No such file or directory: 'g++'" or an "omp.h" error)."""

    def build_extension(self, ext):
        try:
            return super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, OSError) as error:
            raise BaseError(
                f"building the C++ extension {ext.name} failed: {error}\n"
                "aladin-fast needs a C++17 compiler with OpenMP: g++ >= 9 (Debian / Ubuntu: apt-get install g++), "
                "or clang++ with libomp; the CC and CXX environment variables choose the compiler"
            ) from error

    def copy_file(self, infile, outfile, *args, **kwargs):
        if not (self.inplace and str(outfile).endswith((".so", ".pyd"))):
            return super().copy_file(infile, outfile, *args, **kwargs)
        partial = f"{outfile}.partial-{os.getpid()}"
        try:
            result = super().copy_file(infile, partial, *args, **kwargs)
            os.replace(partial, outfile)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return (outfile, result[1]) if isinstance(result, tuple) else result


def _cpu_extension():
    sources = sorted(
        os.path.join("csrc", name) for name in os.listdir(os.path.join(HERE, "csrc")) if name.endswith(".cpp")
    )
    compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    link_args = ["-fopenmp"]
    if os.environ.get("ALADIN_FAST_SANITIZE"):
        # opt-in ASan/UBSan build (see Makefile target `sanitize`)
        compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
        link_args += ["-fsanitize=address,undefined"]
    # headers and the per-ISA kernel body (#included): a change there must rebuild the extension too
    depends = sorted(
        os.path.join("csrc", name) for name in os.listdir(os.path.join(HERE, "csrc")) if name.endswith((".h", ".inc"))
    )
    return Pybind11Extension(
        "aladin_fast._C",
        sources,
        depends=depends,
        include_dirs=[os.path.join(HERE, "csrc")],
        cxx_std=17,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )


setup(
    name="aladin-fast",
    version=_read_version(),
    description="Fused word-region alignment kernels (Triton + C++) for ALADIN/TERAN-style image-text retrieval",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["aladin_fast", "aladin_fast.*"]) + ["aladin_fast.kernels"],
    package_dir={"aladin_fast.kernels": "kernels"},
    ext_modules=[_cpu_extension()],
    cmdclass={"build_ext": AtomicBuildExt},
    install_requires=[
        "torch>=2.4,<2.16", "triton>=3.0", "numpy>=1.24", "tqdm>=4.60",
        "tomli>=1.1; python_version < '3.11'",  # .toml training configs (the standard library's tomllib is 3.11+)
    ],
    extras_require={
        "cpu": ["faiss-cpu>=1.8"],
        # `aladin-fast demo`: the faiss student index and the report's plots (with CUDA, a CUDA build of faiss serves)
        "demo": ["faiss-cpu>=1.8", "matplotlib>=3.7"],
        "gpu": ["faiss-gpu>=1.7"],
        "milvus": ["pymilvus>=2.4", "milvus-lite>=2.4"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httptools>=0.6", "uvloop>=0.19; sys_platform != 'win32'"],
        # pybind11 / setuptools: tests/test_packaging.py runs setup.py (sdist / egg_info / build_py) in this venv
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6.100", "matplotlib>=3.7", "pybind11>=2.12",
                "setuptools>=69"],
        # benchmark baselines: fast-maxsim ships wheels only (no sdist); 1 MB, needs only numpy
        "bench": [
            "pytest-benchmark>=4",
            "matplotlib>=3.7",
            "fast-maxsim==0.2.0; sys_platform == 'linux' and platform_machine == 'x86_64'",
        ],
    },
    entry_points={"console_scripts": ["aladin-fast=aladin_fast.cli:main"]},
    zip_safe=False,
)
