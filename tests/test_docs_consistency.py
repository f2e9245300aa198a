"""README.md and docs/*.md state only what the code does: their concrete claims are parsed and checked.

* Names: every ``aladin_fast.X`` / ``_C.X`` / ``Class.member`` resolves, every identifier in a code span
  (``snake_case``, ``UPPER_CASE``, ``CamelCase``) exists in the sources, and every call written out with
  its arguments (``alignment_scores(text, images, ..., aggregation="MrSw", ...)``, ``_C.layout_for(...)``)
  matches the real signature: names, order, keyword-only marker, literal defaults, and, when the list has
  no ``...``, every parameter.
* Environment variables: every ``ALADIN_FAST_*`` that the code, the benchmarks or the tests read is
  documented, every variable the docs name exists, and documented values are accepted
  (``ALADIN_FAST_TRITON_BACKWARD=atomic``, ``ALADIN_FAST_CPU_LAYOUT=words|dot``, ...); numeric defaults in
  a table of variables equal the C++ ``env_int`` defaults.
* Command lines: ``python -m aladin_fast <sub> --flag ...`` lines parse with the real argparse parsers
  (nothing is run), ``make <target> VAR=`` names a Makefile target / variable, ``pytest <file> -m <mark>``
  names an existing file and registered markers, ``script.py --flag`` names a flag of that script.
* Paths and test ids: repository paths exist, file names in code spans exist somewhere in the repository,
  ``tests/test_x.py::test_y`` names a test function.
* Recorded numbers: the tables and sentences that quote a stored result file (training acceptance, CPU
  benchmark, demo, host work) agree with that file to the printed precision; the sanitizer test list and
  the Triton index limits agree with the Makefile and ``aladin_fast/ops/limits.py``.

Prose is never matched word for word: a quoted number is checked only where its sentence is found, and
the tables are located by their headers. Runs in a few seconds: no network, no GPU, nothing trained.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import functools
import glob
import importlib
import inspect
import io
import json
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SOURCE_DIRS = ("aladin_fast", "kernels", "csrc", "benchmarks", "tests")
SOURCE_EXTENSIONS = (".py", ".cpp", ".h", ".inc", ".sh")
SOURCE_FILES_AT_ROOT = ("setup.py", "Makefile", "pyproject.toml")
SKIP_DIRS = {".git", ".venv", "build", "__pycache__", ".hypothesis", ".pytest_cache", "node_modules", "reports"}
THIS_FILE = os.path.abspath(__file__)
ACCEPTANCE = "benchmarks/results/training-acceptance"
CPU_BENCH = "benchmarks/results/cpu-amd-epyc-2threads.json"


# ------------------------------------------------------------------ reading the docs and the sources

def _read(relative: str) -> str:
    with open(os.path.join(ROOT, relative), encoding="utf-8") as handle:
        return handle.read()


@functools.lru_cache(maxsize=None)
def _docs() -> dict:
    return {name: _read(name) for name in DOC_FILES}


def _flat(text: str) -> str:
    """Whitespace collapsed, emphasis dropped: sentences that wrap over lines match one regex."""
    return re.sub(r"\s+", " ", text.replace("**", ""))


_FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _fenced(language: str = "bash"):
    for name, text in _docs().items():
        for lang, body in _FENCE.findall(text):
            if lang == language:
                yield name, body


@functools.lru_cache(maxsize=None)
def _spans() -> tuple:
    """Inline code spans ``(doc, text)`` outside fenced blocks."""
    out = []
    for name, text in _docs().items():
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", _FENCE.sub("", text)):
            out.append((name, span.strip()))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _source_files() -> tuple:
    files = [os.path.join(ROOT, name) for name in SOURCE_FILES_AT_ROOT if os.path.exists(os.path.join(ROOT, name))]
    for top in SOURCE_DIRS:
        for folder, dirs, names in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            files += [os.path.join(folder, n) for n in names if n.endswith(SOURCE_EXTENSIONS)]
    return tuple(sorted(f for f in files if os.path.abspath(f) != THIS_FILE))


@functools.lru_cache(maxsize=None)
def _source_text() -> str:
    parts = []
    for path in _source_files():
        with open(path, encoding="utf-8", errors="replace") as handle:
            parts.append(handle.read())
    return "\n".join(parts)


@functools.lru_cache(maxsize=None)
def _source_words() -> frozenset:
    return frozenset(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", _source_text()))


@functools.lru_cache(maxsize=None)
def _result_words() -> frozenset:
    """Keys and words of the stored results (``student_round_2`` of tuning.json): docs quote them too."""
    words = set()
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "results", "**", "*.json"), recursive=True):
        with open(path, encoding="utf-8") as handle:
            words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", handle.read()))
    return frozenset(words)


@functools.lru_cache(maxsize=None)
def _repo_basenames() -> frozenset:
    names = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        names.update(files)
        names.update(dirs)
    return frozenset(names)


@functools.lru_cache(maxsize=None)
def _class_members() -> dict:
    """``{class name: member names}`` of every class in aladin_fast/ and kernels/ (AST: nothing imported):
    methods, class attributes and annotations, and ``self.x`` assignments in its methods."""
    members: dict = {}
    for path in _source_files():
        if not path.endswith(".py") or os.path.relpath(path, ROOT).split(os.sep)[0] not in ("aladin_fast", "kernels"):
            continue
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            names = members.setdefault(node.name, set())
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
            for sub in ast.walk(node):
                targets = sub.targets if isinstance(sub, ast.Assign) else [getattr(sub, "target", None)]
                for target in targets:
                    if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                            and target.value.id == "self"):
                        names.add(target.attr)
    return members


@functools.lru_cache(maxsize=None)
def _test_functions(relative: str) -> frozenset:
    """``test_x`` and ``TestY::test_x`` ids defined in one test file."""
    tree = ast.parse(_read(relative))
    ids = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            ids.add(node.name)
        elif isinstance(node, ast.ClassDef):
            ids.add(node.name)
            ids.update(f"{node.name}::{item.name}" for item in node.body
                       if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return frozenset(ids)


def _tables(text: str):
    """Markdown tables as ``(header cells, [row cells])``."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            yield header, rows
        else:
            i += 1


def _cells(line: str):
    return [cell.strip().replace("**", "") for cell in line.strip().strip("|").split("|")]


def _close(shown: str, value: float, scale: float = 1.0) -> bool:
    """``shown`` (a number as printed, commas allowed) is ``value * scale`` rounded to the printed digits."""
    shown = shown.replace(",", "").rstrip(".")
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown) - value * scale) <= 0.5 * 10 ** -decimals + 1e-9 * max(1.0, abs(value * scale))


@functools.lru_cache(maxsize=None)
def _json(relative: str):
    return json.loads(_read(relative))


# ------------------------------------------------------------------ names and signatures

def _resolve(dotted: str):
    """The object a documented dotted name refers to, or raise. Non-package names give None (not checked)."""
    parts = dotted.split(".")
    if parts[0] == "_C":
        parts = ["aladin_fast", "_C"] + parts[1:]
    if parts[0] == "reference":
        parts = ["aladin_fast", "reference"] + parts[1:]
    if parts[0] == "trainer":
        parts = ["Trainer"] + parts[1:]
    if parts[0] == "aladin_fast":
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            return obj
        raise ImportError(dotted)
    members = _class_members()
    if parts[0] in members and len(parts) == 2:
        if parts[1] not in members[parts[0]]:
            raise AttributeError(f"{parts[0]} has no member {parts[1]!r}")
        return True
    return None


def _documented_dotted_names():
    names = set()
    for doc, span in _spans():
        match = re.match(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?$", span)
        if match:
            names.add((doc, match.group(1)))
    for doc, text in _docs().items():
        names.update((doc, name.rstrip(".")) for name in re.findall(r"\baladin_fast(?:\.[A-Za-z_]\w*)+", text))
    return sorted(names)


def test_documented_dotted_names_resolve():
    importlib.import_module("aladin_fast")  # registers the torch.library op checked below

    checked, missing = 0, []
    for doc, name in _documented_dotted_names():
        try:
            if _resolve(name) is not None:
                checked += 1
        except (ImportError, AttributeError) as error:
            missing.append(f"{doc}: `{name}` ({error})")
    assert not missing, "\n".join(missing)
    assert checked >= 10, checked
    import torch

    for doc, span in _spans():  # `aladin_fast::score_tokens`: a registered torch.library op
        for namespace, op in re.findall(r"^(aladin_fast)::(\w+)$", span):
            assert hasattr(getattr(torch.ops, namespace), op), f"{doc}: `{span}` is not a registered op"


def test_identifiers_in_code_spans_exist_in_the_sources():
    words = _source_words() | _result_words()
    missing = []
    for doc, span in _spans():
        name = span[:-2] if span.endswith("()") else span
        snake = re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+", name) and len(name) > 3
        camel = re.fullmatch(r"[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+", name)
        if (snake or camel) and name not in words and not hasattr(builtins, name):
            missing.append(f"{doc}: `{span}`")
    for doc, text in _docs().items():  # UPPER_CASE names anywhere: constants, env / make variables
        for name in sorted(set(re.findall(r"\b_?[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", text))):
            if name not in words:
                missing.append(f"{doc}: {name}")
    assert not missing, "named in the docs but nowhere in the sources:\n" + "\n".join(missing)


def _split_args(text: str):
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def _signature(func):
    """``[(name, kind, default)]``; pybind11 functions are read from their docstring's first line."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        signature = None
    if signature is not None and not (len(signature.parameters) == 2 and "args" in signature.parameters):
        return [(p.name, p.kind.name, p.default) for p in signature.parameters.values()]
    first = (func.__doc__ or "").splitlines()[0]
    inner = first[first.index("(") + 1:first.rindex(")")]
    params = []
    for piece in _split_args(inner):
        match = re.match(r"(\w+)(?::[^=]*)?(?:=\s*(.+))?$", piece.strip())
        default = inspect.Parameter.empty
        if match.group(2) is not None:
            with contextlib.suppress(ValueError, SyntaxError):
                default = ast.literal_eval(match.group(2).strip())
        params.append((match.group(1), "POSITIONAL_OR_KEYWORD", default))
    return params


def _callable(name: str):
    import aladin_fast
    from aladin_fast.ops import backends

    if "." in name:
        obj = _resolve(name)
        return obj if callable(obj) else None
    for owner in (aladin_fast, backends.cpu_kernels()):
        if callable(getattr(owner, name, None)):
            return getattr(owner, name)
    return None


def _written_out_calls():
    for doc, span in _spans():
        match = re.fullmatch(r"([A-Za-z_][\w.]*)\((.*)\)", span)
        if match and re.search(r"[A-Za-z_]", match.group(2)):
            yield doc, span, match.group(1), match.group(2)


def test_written_out_signatures_match_the_code():
    checked, problems = 0, []
    for doc, span, name, args in _written_out_calls():
        func = _callable(name)
        if func is None:
            continue
        params = _signature(func)
        index = {p[0]: i for i, p in enumerate(params)}
        pieces = _split_args(args)
        strict = "*" in pieces  # a signature with its keyword-only marker, not a call
        complete, keyword_only, last = True, False, -1
        documented = []
        for piece in pieces:
            if piece == "..." or piece.endswith("=..."):
                complete = False
                continue
            if piece == "*":
                keyword_only = True
                continue
            ident = re.match(r"[A-Za-z_]\w*", piece)
            if not ident:
                complete = False
                continue
            pname = ident.group(0)
            documented.append(pname)
            where = f"{doc}: `{span}`: {pname}"
            if pname not in index:
                problems.append(f"{where} is not a parameter of {name}{[p[0] for p in params]}")
                continue
            _, kind, default = params[index[pname]]
            if index[pname] < last:
                problems.append(f"{where} is out of order")
            last = index[pname]
            if keyword_only and kind != "KEYWORD_ONLY":
                problems.append(f"{where} is documented keyword-only but is {kind}")
            if not keyword_only and kind == "KEYWORD_ONLY" and (strict or "=" not in piece):
                problems.append(f"{where} is keyword-only in the code")
            if "=" in piece:
                value = piece.split("=", 1)[1].strip()
                if value == "...":
                    continue
                try:
                    literal = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    continue  # chunk=... or an expression: not a default
                if default is inspect.Parameter.empty or default != literal or type(default) is not type(literal):
                    problems.append(f"{where}: documented default {value}, code default {default!r}")
        if complete:
            undocumented = [p[0] for p in params if p[0] not in documented and not p[1].startswith("VAR_")]
            if undocumented:
                problems.append(f"{doc}: `{span}` lists every parameter but misses {undocumented}")
        checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 3, checked


def test_paired_and_rerank_take_the_same_keywords_as_alignment_scores():
    import aladin_fast

    def keywords(func):
        return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()
                if p.name not in ("text", "images", "candidates")]

    assert keywords(aladin_fast.paired_scores) == keywords(aladin_fast.alignment_scores)
    assert keywords(aladin_fast.rerank_scores) == keywords(aladin_fast.alignment_scores)


def test_documented_keyword_values_are_accepted_by_the_op():
    """``backend="reference"``, ``padding="zero"``, ``return_argmax=True``, ... as written in the docs."""
    import torch

    import aladin_fast

    parameters = inspect.signature(aladin_fast.alignment_scores).parameters
    text, images = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    checked, problems = 0, []
    for doc, span in _spans():
        match = re.fullmatch(r"(\w+)=(.+)", span)
        if not match or match.group(1) not in parameters or match.group(1).endswith("cu_seqlens"):
            continue
        try:
            value = ast.literal_eval(match.group(2))
        except (ValueError, SyntaxError):
            continue
        try:
            aladin_fast.alignment_scores(text, images, **{match.group(1): value})
        except (ValueError, TypeError, RuntimeError) as error:
            problems.append(f"{doc}: `{span}`: {error}")
        checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 2, checked


# ------------------------------------------------------------------ environment variables

def _documented_text() -> str:
    return "\n".join(_docs().values())


def test_every_aladin_fast_variable_the_code_reads_is_documented():
    read = set(re.findall(r"\bALADIN_FAST_[A-Z0-9_]*[A-Z0-9]\b", _source_text()))
    documented = set(re.findall(r"\bALADIN_FAST_[A-Z0-9_]*[A-Z0-9]\b", _documented_text()))
    assert read, "no ALADIN_FAST_* variable found in the sources"
    assert not read - documented, f"read by the code but not documented: {sorted(read - documented)}"


def test_every_documented_variable_exists_in_the_sources():
    text = _documented_text()
    named = set(re.findall(r"\bALADIN_FAST_[A-Z0-9_]*[A-Z0-9]\b", text))
    named |= set(re.findall(r"\b([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*)=", text))
    missing = sorted(name for name in named if name not in _source_words())
    assert not missing, f"documented but read nowhere: {missing}"


def _documented_assignments():
    """``NAME=value`` as written in the docs, alternatives (``words|dot``) split."""
    for doc, text in _docs().items():
        for name, values in re.findall(r"\b([A-Z][A-Z0-9_]+)=([\w:.|-]+)", text):
            for value in values.split("|"):
                yield doc, name, value


def test_documented_variable_values_are_accepted(monkeypatch):
    from aladin_fast.ops import alignment_op, backends

    cpu = backends.cpu_kernels()
    validators = {
        "ALADIN_FAST_TRITON_BACKWARD": lambda v: alignment_op.triton_backward_strategy() == v,
        "ALADIN_FAST_TRITON_KERNEL": lambda v: alignment_op._triton_kernel_choice() == {"kernel": v},
        "ALADIN_FAST_CPU_LAYOUT": lambda v: cpu.layout_for(4, 4, 8) == v,
        "ALADIN_FAST_BACKWARD_WORKSPACE_MB": lambda v: alignment_op.backward_workspace_bytes() > 0,
        "CUBLAS_WORKSPACE_CONFIG": lambda v: v in alignment_op._DETERMINISTIC_CUBLAS_CONFIGS,
    }
    checked, problems = 0, []
    for doc, name, value in _documented_assignments():
        if name not in validators or value in ("N", "DIR"):
            continue
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            try:
                ok = validators[name](value)
            except (ValueError, RuntimeError) as error:
                ok = f"{type(error).__name__}: {error}"
        if ok is not True:
            problems.append(f"{doc}: {name}={value} ({ok})")
        checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 4, checked


def test_documented_defaults_of_variables():
    """Tables of variables (first cell the variable, second its default) and "`X`, default N MiB" phrases."""
    from aladin_fast.ops import alignment_op

    defaults = {name: int(value) for name, value in
                re.findall(r'env_int\("(ALADIN_FAST_\w+)",\s*(-?\d+)\)', _source_text())}
    checked = 0
    for doc, text in _docs().items():
        for header, rows in _tables(text):
            for row in rows:
                name = re.fullmatch(r"`(ALADIN_FAST_\w+)`", row[0])
                shown = re.match(r"(-?\d+)\b", row[1]) if len(row) > 1 else None
                if name and shown and name.group(1) in defaults:
                    assert defaults[name.group(1)] == int(shown.group(1)), (doc, row)
                    checked += 1
        for mib in re.findall(r"ALADIN_FAST_BACKWARD_WORKSPACE_MB`?,? default (\d+) MiB", _flat(text)):
            with pytest.MonkeyPatch.context() as patch:
                patch.delenv("ALADIN_FAST_BACKWARD_WORKSPACE_MB", raising=False)
                assert alignment_op.backward_workspace_bytes() == int(mib) << 20, doc
            checked += 1
    assert checked >= 1, checked


# ------------------------------------------------------------------ command lines

def _command_lines():
    """``(doc, line)`` for every command in bash blocks (continuations joined) and code spans."""
    for doc, body in _fenced("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip():
                yield doc, line.strip()
    for doc, span in _spans():
        if re.match(r"^(?:[A-Z_]+=\S+ )*(?:python -m aladin_fast|make |pytest )", span) \
                or re.match(r"^[\w/.-]+\.py --", span):
            yield doc, span


def _options(parser: argparse.ArgumentParser) -> set:
    return {option for action in parser._actions for option in action.option_strings}


def _subparser(parser: argparse.ArgumentParser, name: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _aladin_parser(tokens):
    """The parser that ``python -m aladin_fast <tokens>`` uses, the argv it gets, and its option set."""
    from aladin_fast import acceptance, cli, evaluate
    from aladin_fast.training import command

    sub = tokens[0]
    if sub == "train":
        parser = command.build_parser()
        return parser, tokens, _options(_subparser(parser, "train"))
    if sub == "acceptance":
        parser = acceptance.build_parser()
        return parser, tokens[1:], _options(parser)
    if sub == "evaluate":
        parser = evaluate.build_parser()
        return parser, tokens[1:], _options(parser)
    parser = cli._build_parser()
    subparser = _subparser(parser, sub)
    return parser, tokens, (_options(subparser) if subparser is not None else None)


def _parse(parser, argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            return f"exit {exit_.code}: {err.getvalue().strip()[-300:]}"
    return None


@functools.lru_cache(maxsize=None)
def _makefile():
    text = _read("Makefile")
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))
    variables = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*[?:+]?=", text, flags=re.M))
    return text, targets, variables


def test_documented_command_lines_parse():
    checked, problems = 0, []
    for doc, line in _command_lines():
        command, _, comment = line.partition(" #")
        flags_in_comment = re.findall(r"(?<![\w-])--[a-z][\w-]*", comment)
        tokens = shlex.split(command)
        while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
            tokens = tokens[1:]
        if not tokens:
            continue
        where = f"{doc}: `{line}`"
        if tokens[:3] == ["python", "-m", "aladin_fast"]:
            args = [t for t in tokens[3:] if t != "..."]
            parser, argv, options = _aladin_parser(args)
            if options is None:
                problems.append(f"{where}: no subcommand {args[0]!r}")
                continue
            flags = [t.split("=")[0] for t in args if t.startswith("--")] + flags_in_comment
            unknown = [flag for flag in flags if flag not in options]
            if unknown:
                problems.append(f"{where}: unknown flags {unknown}")
            elif "--help" not in args and any(t.startswith("-") for t in args):
                error = _parse(parser, argv)
                if error:
                    problems.append(f"{where}: {error}")
                elif args[0] == "train" and "--config" not in args:  # the flags make a valid TrainConfig
                    from aladin_fast.training.config import config_from_arguments

                    try:
                        config_from_arguments(parser.parse_args(argv)).validate()
                    except ValueError as error:
                        problems.append(f"{where}: {error}")
        elif tokens[0] == "make":
            _, targets, variables = _makefile()
            for token in tokens[1:]:
                if "=" in token:
                    if token.split("=")[0] not in variables:
                        problems.append(f"{where}: no Makefile variable {token.split('=')[0]}")
                elif token not in targets:
                    problems.append(f"{where}: no Makefile target {token}")
        elif tokens[0] == "pytest":
            for token in tokens[1:]:
                if token.startswith("tests/") or token.startswith("benchmarks/"):
                    if not os.path.exists(os.path.join(ROOT, token.split("::")[0])):
                        problems.append(f"{where}: no file {token}")
            if "-m" in tokens:
                expression = tokens[tokens.index("-m") + 1]
                registered = re.findall(r'"(\w+):', _read("pyproject.toml"))
                for marker in set(re.findall(r"\w+", expression)) - {"not", "and", "or"}:
                    if marker not in registered:
                        problems.append(f"{where}: marker {marker!r} is not registered in pyproject.toml")
        elif tokens[0].endswith(".py"):
            scripts = [p for p in glob.glob(os.path.join(ROOT, "**", os.path.basename(tokens[0])), recursive=True)
                       if not set(os.path.relpath(p, ROOT).split(os.sep)) & SKIP_DIRS]
            if not scripts:
                problems.append(f"{where}: no script {tokens[0]}")
                continue
            source = "\n".join(open(p, encoding="utf-8").read() for p in scripts)
            for flag in (t for t in tokens[1:] if t.startswith("--")):
                if f'"{flag}"' not in source and f"'{flag}'" not in source:
                    problems.append(f"{where}: {tokens[0]} has no option {flag}")
        else:
            continue
        checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 10, checked


# ------------------------------------------------------------------ paths and test ids

_REPO_PATH = re.compile(r"(?<![\w./-])((?:aladin_fast|kernels|csrc|benchmarks|tests|docs)/[\w./<>*-]*)")


def test_documented_repository_paths_exist():
    missing = []
    for doc, text in _docs().items():
        for path in _REPO_PATH.findall(text):
            path = path.rstrip(".")
            if "<" in path or "*" in path:
                continue  # a template (<machine>.json) or a build product (_C*.so)
            if not os.path.exists(os.path.join(ROOT, path)):
                missing.append(f"{doc}: {path}")
    for doc, span in _spans():  # file names written alone: student_sweep.py, SUMMARY.md, kernel_driver.cpp
        if re.fullmatch(r"[\w.-]+\.(?:py|cpp|h|inc|md|json|png|sh)", span) and span not in _repo_basenames():
            missing.append(f"{doc}: `{span}`")
    assert not missing, "\n".join(missing)


def test_cited_test_ids_exist():
    problems, cited = [], 0
    all_tests = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    for doc, text in _docs().items():
        for path, ids in re.findall(r"(tests/test_\w+\.py)((?:::\w+)+)", text):
            cited += 1
            test_id = ids[2:]
            if not os.path.exists(os.path.join(ROOT, path)):
                problems.append(f"{doc}: {path} does not exist")
            elif test_id not in _test_functions(path):
                problems.append(f"{doc}: {path}::{test_id} does not exist")
        for test_id in re.findall(r"(?<![\w/.])::(test_\w+)", text):  # "... and ::test_y" after a cited file
            cited += 1
            if not any(test_id in _test_functions(path) for path in all_tests):
                problems.append(f"{doc}: ::{test_id} exists in no test file")
    assert not problems, "\n".join(problems)
    assert cited >= 5, cited


# ------------------------------------------------------------------ numbers quoted from stored results

def _acceptance_value(results, model: str, column: str):
    metrics, stage = results["metrics"][model], results["stages"][model]
    return {"rsum": metrics["rsum"], "train s": stage["seconds"], "CPU s": stage["cpu_seconds"],
            "steps": stage["steps"], "load": (stage.get("load") or {}).get("mean_1min")}.get(column, metrics.get(column))


def test_acceptance_tables_match_results_json():
    """Every table with a ``model`` column and an ``rsum`` column quotes the recorded seed-0 run."""
    results = _json(f"{ACCEPTANCE}/results.json")
    checked, problems = 0, []
    for doc, text in _docs().items():
        for header, rows in _tables(text):
            if not header or header[0] != "model" or "rsum" not in header:
                continue
            columns, direction = [], ""
            for cell in header[1:]:
                found = re.match(r"(i2t|t2i)? ?R@(\d+)$", cell)
                if found:
                    direction = found.group(1) or direction
                    columns.append(f"{direction}_r{found.group(2)}")
                else:
                    columns.append(cell.split(" (")[0])
            for row in rows:
                model = next((m for m in ("student", "baseline", "teacher") if m in row[0]), None)
                assert model, (doc, row)
                for column, shown in zip(columns, row[1:]):
                    value = _acceptance_value(results, model, column)
                    if value is None or not re.fullmatch(r"[\d.,]+", shown):
                        continue
                    checked += 1
                    if not _close(shown, value):
                        problems.append(f"{doc}: {model} {column} {shown}, results.json {value}")
    assert not problems, "\n".join(problems)
    assert checked >= 9, checked


def _bench_shape(description: str) -> str:
    """The shape key of cpu-amd-epyc-2threads.json that a README row describes."""
    d = description.replace(",", "")

    def num(pattern, default=None):
        found = re.search(pattern, d)
        return found.group(1) if found else default

    w, r, dim = num(r"\bW(\d+)", "32"), num(r"\bR(\d+)", "36"), num(r"\bD(\d+)")
    if d.startswith("rerank"):
        q, k = re.search(r"rerank (\d+) x (?:K=)?(\d+)", d).groups()
        return f"rerank_Q{q}_K{k}_W{w}_R{r}_D{dim}"
    batch = num(r"(\d+) x")
    if d.startswith("all pairs"):
        return f"allpairs_B{batch}_W{w}_R{r}_D{dim}"
    if d.startswith("gallery"):
        t, i = re.search(r"gallery (\d+) x (\d+)", d).groups()
        return f"gallery_T{t}_I{i}_W{w}_R{r}_D{dim}"
    if d.startswith("training"):
        return f"train_B{batch}_W{w}_R{r}_D{dim}"
    if "fast-maxsim" in d:
        lq, ld, n = num(r"Lq(\d+)"), num(r"Ld(\d+)"), num(r"(\d+) docs")
        return f"maxsim_Lq{lq}_Ld{ld}_D{dim}_N{n}"
    raise AssertionError(f"README CPU table: no benchmark shape for row {description!r}")


def test_cpu_performance_table_matches_the_recorded_benchmark():
    bench = _json(CPU_BENCH)
    rows = {(row["shape"], row["provider"]): row for row in bench["rows"]}
    checked, problems = 0, []
    for header, table in _tables(_docs()["README.md"]):
        if not any("% of FMA peak" in cell for cell in header):
            continue
        shape = None
        for cells in table:
            bf16 = cells[0].startswith("same")
            shape = shape if bf16 else _bench_shape(cells[0])
            row = rows.get((shape, f"aladin_fast_cpu_{'bf16' if bf16 else 'fp32'}"))
            assert row is not None, f"README CPU table row {cells[0]!r}: {shape} not in {CPU_BENCH}"
            expected = []
            for shown, unit in re.findall(r"([\d.]+) (GFLOP/s|ms|GB/s)", cells[1]):
                expected.append((shown, {"GFLOP/s": row["gflops"], "ms": row["median_s"] * 1e3,
                                         "GB/s": row["gbytes_per_s"]}[unit]))
            first = re.match(r"(\d+)%", cells[2])
            if first:
                expected.append((first.group(1), 100 * row["fraction_of_fma_peak"]))
            roof = re.search(r"(\d+)% of the bandwidth roof", cells[2])
            if roof:
                expected.append((roof.group(1), 100 * row["fraction_of_roofline"]))
            speedups = row.get("speedup_vs") or {}
            torch_best = min(v for k, v in speedups.items() if k.startswith("torch"))
            shown = re.match(r"([\d.]+)x", cells[3])
            if shown:
                expected.append((shown.group(1), torch_best))
            shown = re.match(r"([\d.]+)x", cells[4]) if len(cells) > 4 else None
            if shown:
                expected.append((shown.group(1), speedups["fast_maxsim_fp32"]))
            for shown, value in expected:
                checked += 1
                if not _close(shown, value):
                    problems.append(f"README CPU table, {cells[0]!r}: {shown} but {CPU_BENCH} gives {value:.4g}")
    assert not problems, "\n".join(problems)
    assert checked >= 40, checked


def _prose_claims():
    """``(doc, regex over the flattened text, [(group, expected value)] builder)``: checked where found."""
    seed0 = _json(f"{ACCEPTANCE}/results.json")
    seed1 = _json(f"{ACCEPTANCE}/seed1/results.json")
    demo = _json("benchmarks/results/demo-cpu-amd-epyc-2threads/results.json")
    peaks = _json(CPU_BENCH)["peaks"]

    def host_us(label):
        rows = _json(f"benchmarks/results/host-work/{label}.json")["rows"]
        return {r["dtype"]: r["python_us"] for r in rows if r["aggregation"] == "MrSw"}

    def sweep(k):
        entry = next(e for e in demo["rerank_sweep"] if e["rerank_k"] == int(k))
        return entry, demo["scorers"]["teacher"]["latency"]["single_ms"] / entry["latency"]["single_ms"]

    def r1(results, model):
        return [results["metrics"][model]["i2t_r1"], results["metrics"][model]["t2i_r1"]]

    return [
        ("README.md", r"FMA peak probe \(`_C.fma_peak`[^)]*\) read ([\d.]+) GFLOP/s, streaming reads ([\d.]+) GB/s"
                      r" \(`_C.read_bandwidth`\) and torch.mm 2048² sgemm ([\d.]+) GFLOP/s",
         lambda m: [peaks["fma_peak_gflops"], peaks["read_bandwidth_gbs"], peaks["sgemm_gflops"]]),
        ("README.md", r"\((\d+) s in `benchmarks/results/demo-cpu-amd-epyc-2threads/`\)",
         lambda m: [demo["timings"]["total_seconds"]]),
        ("README.md", r"student alone reaches rsum ([\d.]+) against the exhaustive teacher's ([\d.]+)",
         lambda m: [demo["scorers"]["student"]["metrics"]["rsum"], demo["scorers"]["teacher"]["metrics"]["rsum"]]),
        ("README.md", r"keeps (\d+)% of the teacher's rsum at ([\d.]+)x its speed per query",
         lambda m: [100 * demo["scorers"]["two_stage"]["metrics"]["rsum"] / demo["scorers"]["teacher"]["metrics"]["rsum"],
                    demo["speedup_two_stage_vs_teacher"]]),
        ("README.md", r"\(the top (\d+): (\d+)% at ([\d.]+)x\)",
         lambda m: [int(m.group(1)), 100 * sweep(m.group(1))[0]["rsum_fraction_of_teacher"], sweep(m.group(1))[1]]),
        ("README.md", r"Python \+ dispatch per fwd\+bwd on this CPU: (\d+) → (\d+) µs(?: \(bf16; fp32 (\d+) → (\d+)\))?",
         lambda m: [host_us("da8949b")["bfloat16"], host_us("session6")["bfloat16"],
                    host_us("da8949b")["float32"], host_us("session6")["float32"]]),
        ("README.md", r"rsum by chance is ([\d.]+)", lambda m: [seed0["chance_rsum"]]),
        ("README.md", r"cached once, ([\d.]+) s of the 240", lambda m: [seed0["stages"]["student"]["cache_seconds"]]),
        ("README.md", r"\(([\d,]+) steps in 240 s\)", lambda m: [seed0["stages"]["student"]["steps"]]),
        ("README.md", r"The student keeps (\d+)% \(i2t\) and (\d+)% \(t2i\) of the teacher's R@1 \(a second seed: (\d+)%"
                      r" and (\d+)%",
         lambda m: [100 * a / b for a, b in zip(r1(seed0, "student") + r1(seed1, "student"),
                                                r1(seed0, "teacher") + r1(seed1, "teacher"))]),
        ("docs/training.md", r"([\d,]+) s in all: oracle checks (\d+) s, training (\d+) s, evaluation (\d+) s",
         lambda m: [seed0["timings"]["total_seconds"], seed0["timings"]["oracle_seconds"],
                    sum(seed0["stages"][s]["seconds"] for s in ("teacher", "baseline", "student")),
                    sum(seed0["timings"]["evaluation_seconds"].values())]),
        ("docs/training.md", r"the teacher is ([\d.]+) \(i2t\) and ([\d.]+) \(t2i\) R@1 points above the baseline",
         lambda m: [a - b for a, b in zip(r1(seed0, "teacher"), r1(seed0, "baseline"))]),
        ("docs/training.md", r"includes? ([\d.]+) s to cache the teacher's tokens",
         lambda m: [seed0["stages"]["student"]["cache_seconds"]]),
        ("docs/training.md", r"gives teacher ([\d.]+) / ([\d.]+), baseline ([\d.]+) / ([\d.]+), student ([\d.]+) /"
                             r" ([\d.]+) R@1: teacher \+([\d.]+) / \+([\d.]+) points, student (\d+)% / (\d+)%",
         lambda m: r1(seed1, "teacher") + r1(seed1, "baseline") + r1(seed1, "student")
         + [a - b for a, b in zip(r1(seed1, "teacher"), r1(seed1, "baseline"))]
         + [100 * a / b for a, b in zip(r1(seed1, "student"), r1(seed1, "teacher"))]),
        ("docs/training.md", r"load ([\d.]+), (\d+) s\)",
         lambda m: [seed1["load_average"]["whole_run"]["mean_1min"], seed1["timings"]["total_seconds"]]),
    ]


def test_numbers_quoted_from_stored_results_match_them():
    found, problems = 0, []
    for doc, pattern, expected in _prose_claims():
        for match in re.finditer(pattern, _flat(_docs()[doc])):
            found += 1
            for shown, value in zip(match.groups(), expected(match)):
                if shown is not None and not _close(shown, value):
                    problems.append(f"{doc}: {match.group(0)!r}: {shown} but the stored result gives {value:.4g}")
    assert not problems, "\n".join(problems)
    assert found >= 5, f"only {found} quoted numbers found: have the sentences moved? update _prose_claims"


def test_sanitizer_test_list_matches_the_makefile():
    text, _, _ = _makefile()
    flat = _flat(_docs()["docs/reliability.md"])
    match = re.search(r"Tests \(`SANITIZE_TESTS`[^)]*\): (.*?) minus `-k \"([^\"]*)\"`", flat)
    if match is None:
        pytest.skip("the sanitizer test list is no longer spelled out in docs/reliability.md")
    tests = re.search(r"^SANITIZE_TESTS \?=(.*?)(?<!\\)\n", text, flags=re.M | re.S).group(1)
    in_make = set(re.findall(r"tests/(test_\w+)\.py", tests))
    assert set(re.findall(r"\btest_\w+", match.group(1))) == in_make
    assert re.search(r"^SANITIZE_K \?= (.*)$", text, flags=re.M).group(1).strip() == match.group(2)


def test_triton_index_limits_table_matches_limits_py():
    from aladin_fast.ops import limits

    rows = {}
    for header, table in _tables(_docs()["docs/reliability.md"]):
        if header[:2] == ["limit", "backends"]:
            rows.update((row[0], row[1]) for row in table)
    assert rows, "the limits table of docs/reliability.md was not found"

    def power(text):  # "2^31 - 17" -> 2147483631
        base, _, minus = text.partition(" - ")
        return 2 ** int(base.split("^")[1]) - int(minus or 0)

    checked = 0
    for limit, backends in rows.items():
        found = re.fullmatch(r"(.*) <= (2\^\d+(?: - \d+)?)", limit)
        assert found, limit
        what, bound = found.group(1), power(found.group(2))
        if what.startswith("padded length"):
            assert bound == limits.INT32_MAX and backends == "all", limit
        elif what == "W_pad, R_pad":
            assert bound == limits.TRITON_MAX_PAD and backends == "triton", limit
        elif what == "W_pad * R_pad":
            assert bound == limits.INT32_MAX and backends == "triton", limit
        elif what == "K":
            assert bound == limits.TRITON_MAX_CANDIDATES and backends == "triton", limit
        elif what.startswith("ceil(Nt * K / "):
            per_program = int(re.search(r"/ (\d+)\)", what).group(1))
            assert (per_program, bound) == (limits.TRITON_MAX_PAIRS_PER_PROGRAM, limits.TRITON_MAX_PROGRAMS), limit
        else:
            raise AssertionError(f"docs/reliability.md limits table: unknown limit {limit!r}")
        checked += 1
    assert checked >= 4, checked


def test_close_rounding_rule():
    assert _close("4.3", 4.3465) and not _close("4.4", 4.3465)
    assert _close("1.01", 1.005) and _close("78", 78.46) and not _close("79", 78.46)
    assert _close("2,837", 2837) and _close("1.6.", 1.6)
