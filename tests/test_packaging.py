"""The package works without triton, and the CLI reports backends."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK_TRITON = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked by the test")
sys.meta_path.insert(0, _Block())
import torch, aladin_fast
from aladin_fast import reference
from aladin_fast.ops.backends import resolve_backend
text, images = torch.randn(3, 5, 16), torch.randn(4, 7, 16)
got = aladin_fast.alignment_scores(text, images)
expected = reference.alignment_scores(text.double(), images.double())
assert resolve_backend("auto", text.device, text.dtype) == "cpu"
assert (got.double() - expected).abs().max().item() < 1e-4
try:
    aladin_fast.alignment_scores(text, images, backend="triton")
except RuntimeError as err:
    assert "triton is not importable" in str(err), err
else:
    raise AssertionError("backend='triton' must raise without triton")
assert "triton" not in sys.modules
print("OK")
"""


def _run(code_or_args, env=None):
    args = [sys.executable, "-c", code_or_args] if isinstance(code_or_args, str) else [sys.executable, *code_or_args]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_import_without_triton_uses_cpu_kernel():
    result = _run(BLOCK_TRITON)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_info_reports_backends():
    result = _run(["-m", "aladin_fast", "info"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "backend.cpu" in out and "built: ISA" in out
    assert "backend.triton" in out and "backend.reference" in out and "faiss" in out


def test_public_api_on_triton_interpreter():
    """The public ops with backend='triton' (CPU tensors, TRITON_INTERPRET=1) vs the float64 reference.

    Runs a subset of test_alignment.py in a child process: Triton picks interpreter or compiler
    mode once per process, so the interpreter cannot share this process with the AOT tests.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    selection = "triton and (rerank_and_paired or ties or empty or nan)"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_alignment.py", "-k", selection],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]


# ---------------------------------------------------------------------------------------------------------------
# What `pip install .` / an sdist / a wheel carries, and what a user meets without the optional parts.

BLOCK_MODULES = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(name + " blocked by the test")
sys.meta_path.insert(0, _Block())
"""


def _package_files(top):
    """Paths (relative to ROOT, '/'-separated) of the .py files under ROOT/top, caches skipped."""
    found = set()
    for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
        dirs[:] = [name for name in dirs if name != "__pycache__"]
        found.update(os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/")
                     for name in files if name.endswith(".py"))
    return found


@pytest.fixture(scope="module")
def egg_info(tmp_path_factory):
    """setup.py's metadata and sdist file list (SOURCES.txt is the manifest `setup.py sdist` packs), written into a
    temporary folder: nothing is written into the checkout. About a second, no compiler."""
    base = tmp_path_factory.mktemp("egg_info")
    result = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(base)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (folder,) = base.glob("*.egg-info")
    return folder


def test_sdist_ships_the_build_inputs_and_no_partial_test_suite(egg_info):
    """The sdist holds everything a wheel is built from; setuptools' default also packed tests/test_*.py without
    conftest.py and the helper modules they import (and without the benchmarks/ and docs/ they read): a test suite
    that cannot run. The suite runs from a clone (`make test`)."""
    shipped = set((egg_info / "SOURCES.txt").read_text().split())
    needed = {"setup.py", "pyproject.toml", "README.md"} | _package_files("aladin_fast") | _package_files("kernels")
    needed |= {f"csrc/{name}" for name in os.listdir(os.path.join(ROOT, "csrc")) if name.endswith((".cpp", ".h", ".inc"))}
    assert not needed - shipped, sorted(needed - shipped)
    tests = {name for name in shipped if name.startswith("tests/")}
    assert not tests, f"the sdist ships a partial test suite: {sorted(tests)[:5]} ..."


def test_install_requirements_cover_the_supported_pythons_and_the_demo(egg_info):
    """python_requires >= 3.10, but .toml configs read tomllib (3.11+): tomli must come with Python 3.10. The demo's
    optional dependencies have an extra that its error message names."""
    requires = (egg_info / "requires.txt").read_text()
    assert "[:python_version < \"3.11\"]\ntomli" in requires, requires
    demo = requires.split("[demo]\n", 1)[1].split("\n\n", 1)[0].split()
    assert {line.split(">")[0] for line in demo} == {"faiss-cpu", "matplotlib"}, demo
    metadata = (egg_info / "PKG-INFO").read_text()
    assert "Requires-Python: >=3.10" in metadata


def test_version_metadata_matches_the_package(egg_info):
    from importlib import metadata

    import aladin_fast

    assert f"\nVersion: {aladin_fast.__version__}\n" in (egg_info / "PKG-INFO").read_text()
    assert metadata.version("aladin-fast") == aladin_fast.__version__  # the installed (editable or not) distribution


def test_toml_config_falls_back_to_tomli_on_python_310(tmp_path, monkeypatch):
    """On Python 3.10 (no tomllib) a .toml training config raised ModuleNotFoundError; tomli has the same API."""
    import tomllib

    from aladin_fast.training.config import load_config_file

    path = tmp_path / "train.toml"
    path.write_text('lr = 0.5\nname = "x"\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ImportError, as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    assert load_config_file(str(path)) == {"lr": 0.5, "name": "x"}
    path.write_text("lr = = 1\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config_file(str(path))


def test_wheel_layout_from_the_setup_configuration(tmp_path):
    """What build_py puts in a wheel (no compiler): the Triton kernels inside the package as aladin_fast.kernels
    (never a top-level `kernels`, a name taken on PyPI), every subpackage, and no tests."""
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    built = {os.path.relpath(os.path.join(folder, name), tmp_path).replace(os.sep, "/")
             for folder, _, files in os.walk(tmp_path) for name in files if not name.endswith(".pyc")}
    expected = _package_files("aladin_fast") | {"aladin_fast/" + name for name in _package_files("kernels")}
    assert built == expected, (sorted(built - expected), sorted(expected - built))
    assert sorted(os.listdir(tmp_path)) == ["aladin_fast"]


def test_a_failed_compile_says_what_the_build_needs(tmp_path):
    """Without a usable compiler the build said only "[Errno 2] No such file or directory: '/usr/bin/g++'"."""
    env = dict(os.environ, CC="/nonexistent/gcc", CXX="/nonexistent/g++")
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp_path / "temp"),
                             "--build-lib", str(tmp_path / "lib")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    message = result.stderr
    assert "building the C++ extension aladin_fast._C failed" in message and "/nonexistent/g++" in message, message
    assert "C++17 compiler with OpenMP" in message and "CXX" in message, message


UNINSTALLED_TREE = """
import os, sys, warnings
# the checkout's editable install would resolve aladin_fast._C / aladin_fast.kernels from the checkout
sys.meta_path[:] = [finder for finder in sys.meta_path if "__editable__" not in getattr(finder, "__module__", "")]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, aladin_fast
assert aladin_fast.__file__.startswith(os.getcwd()), aladin_fast.__file__
messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
assert any("aladin_fast._C and no aladin_fast.kernels" in m and "pip install -e ." in m for m in messages), messages
text, images = torch.randn(3, 5, 16), torch.randn(4, 7, 16)
expected = aladin_fast.alignment_scores(text.double(), images.double())
assert (aladin_fast.alignment_scores(text, images).double() - expected).abs().max().item() < 1e-4  # the reference
try:
    aladin_fast.alignment_scores(text, images, backend="cpu")
except RuntimeError as err:
    assert "aladin_fast._C" in str(err) and "pip install -e ." in str(err), err
else:
    raise AssertionError("backend='cpu' must raise without the extension")
try:
    import triton
except ImportError:
    triton = None
if triton is not None:
    try:
        aladin_fast.alignment_scores(text, images, backend="triton")
    except RuntimeError as err:  # it said "triton is not importable" with triton installed
        assert "triton is not importable" not in str(err) and "aladin_fast.kernels" in str(err), err
        assert "pip install -e ." in str(err), err
    else:
        raise AssertionError("backend='triton' must raise without aladin_fast.kernels")
print("OK")
"""


def test_source_tree_that_was_never_installed_says_so(tmp_path):
    """Importing aladin_fast from a checkout that pip never installed (no _C, no aladin_fast.kernels: setup.py maps
    kernels/ in) silently scored with the slow reference, and backend='triton' blamed a missing triton."""
    shutil.copytree(os.path.join(ROOT, "aladin_fast"), tmp_path / "aladin_fast",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", UNINSTALLED_TREE], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


def test_installed_package_imports_without_warnings():
    result = _run("import warnings; warnings.simplefilter('error'); import aladin_fast; print('OK')")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("blocked", ["faiss", "matplotlib"])
def test_demo_without_an_optional_dependency_says_what_to_install_before_training(tmp_path, blocked):
    """`pip install aladin-fast` has neither faiss nor matplotlib (extras): the demo trained for minutes, then died
    with an ImportError traceback. Now: exit 2 at once, naming the extra."""
    out = tmp_path / "report"
    code = BLOCK_MODULES.format(blocked={blocked}) + (
        "from aladin_fast.cli import main\n"
        f"sys.exit(main(['demo', '--quick', '--out', {str(out)!r}]))\n")
    result = _run(code)
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"needs {blocked}" in result.stderr and "pip install 'aladin-fast[demo]'" in result.stderr, result.stderr
    assert "[1/3]" not in result.stdout and not (out / "training").exists()  # nothing was trained


def test_evaluate_without_faiss_says_so_before_loading_anything(tmp_path):
    code = BLOCK_MODULES.format(blocked={"faiss"}) + (
        "from aladin_fast.cli import main\n"
        f"sys.exit(main(['evaluate', '--checkpoint', {str(tmp_path / 'ckpt.pt')!r}, '--data', {str(tmp_path)!r}]))\n")
    result = _run(code)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "needs faiss" in result.stderr, result.stderr[-3000:]
    assert "pip install 'aladin-fast[cpu]'" in result.stderr


@pytest.mark.slow
def test_wheel_built_from_the_sdist_installs_and_runs_outside_the_checkout(tmp_path, egg_info):
    """The whole chain a user meets (about 2 minutes: compiles the extension): sdist -> wheel in a clean folder ->
    installed into a folder of its own -> used from a directory outside the checkout."""
    import glob
    import zipfile

    tree = tmp_path / "tree"  # `setup.py sdist` stages its tree in the working directory: not in the checkout
    for name in (egg_info / "SOURCES.txt").read_text().split():
        if not os.path.isabs(name):
            os.makedirs(tree / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), tree / name)
    dist = tmp_path / "dist"
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=tree,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (sdist,) = glob.glob(str(dist / "*.tar.gz"))
    shutil.unpack_archive(sdist, tmp_path / "unpacked")
    (source,) = (tmp_path / "unpacked").iterdir()
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                             "-w", str(dist), str(source)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = glob.glob(str(dist / "*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(name.startswith("aladin_fast/_C.") and name.endswith(".so") for name in names), sorted(names)
    expected = _package_files("aladin_fast") | {"aladin_fast/" + name for name in _package_files("kernels")}
    assert not expected - names, sorted(expected - names)
    assert not [name for name in names if name.split("/")[0] in ("tests", "kernels", "csrc", "benchmarks", "docs")]
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), TRITON_INTERPRET="1")
    code = (
        "import warnings; warnings.simplefilter('error', UserWarning)\n"
        "import torch, aladin_fast, importlib.metadata as md\n"
        f"assert aladin_fast.__file__.startswith({str(target)!r}), aladin_fast.__file__\n"
        "assert md.version('aladin-fast') == aladin_fast.__version__\n"
        "text, images = torch.randn(3, 5, 16), torch.randn(4, 7, 16)\n"
        "expected = aladin_fast.alignment_scores(text, images, backend='reference')\n"
        "backends = ['cpu'] + (['triton'] if __import__('importlib.util').util.find_spec('triton') else [])\n"
        "for backend in backends:\n"
        "    got = aladin_fast.alignment_scores(text, images, backend=backend)\n"
        "    assert (got - expected).abs().max().item() < 1e-4, backend\n"
        "print('OK', backends)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
    result = subprocess.run([sys.executable, "-m", "aladin_fast", "info"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "built: ISA" in result.stdout, result.stdout + result.stderr
    assert os.listdir(elsewhere) == []  # nothing written where it ran


def _usage_lines(monkeypatch, argv0):
    from aladin_fast import acceptance, cli, evaluate
    from aladin_fast.serving import cli as serving_cli
    from aladin_fast.training import command

    monkeypatch.setattr(sys, "argv", [argv0])
    return {
        "": cli._build_parser().format_usage(),
        "evaluate": evaluate.build_parser().format_usage(),
        "serve": serving_cli.build_parser().format_usage(),
        "acceptance": acceptance.build_parser().format_usage(),
        "train": command.build_parser().format_usage(),
    }


@pytest.mark.parametrize("argv0, name", [
    ("/usr/local/bin/aladin-fast", "aladin-fast"),
    ("/site-packages/aladin_fast/__main__.py", "python -m aladin_fast"),
    ("/site-packages/aladin_fast/training/__main__.py", "python -m aladin_fast.training"),
])
def test_usage_lines_name_the_command_as_it_was_typed(monkeypatch, argv0, name):
    """Usage lines said `aladin_fast ...` (no such command: the console script is `aladin-fast`) and the training
    command always called itself `python -m aladin_fast.training`, whichever way it was started."""
    for command, usage in _usage_lines(monkeypatch, argv0).items():
        expected = f"usage: {name} {command}".rstrip() if command not in ("", "train") else f"usage: {name}"
        assert usage.startswith(expected + " "), (command, usage)


def test_console_script_usage_errors_name_the_console_script():
    script = os.path.join(os.path.dirname(sys.executable), "aladin-fast")
    if not os.path.exists(script):
        pytest.skip("no aladin-fast console script next to this interpreter")
    done = subprocess.run([script, "evaluate"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "aladin-fast evaluate: error: the following arguments are required: --checkpoint" in done.stderr
