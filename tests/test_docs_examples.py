"""The docs' examples run as written and do what the text around them says.

tests/test_readme.py runs the README's main example and tests/test_docs_consistency.py checks that names,
signatures and variables exist and that documented command lines parse. This file runs the rest:

* every fenced ``python`` block of README.md and docs/*.md runs in a child process (with a timeout), except the
  ones another test runs with checks of its own (``RUN_ELSEWHERE``); every fenced block is ``bash`` or ``python``,
  so a block in another language cannot be skipped unseen;
* every literal block (``::``) of a docstring under aladin_fast/ and kernels/ is classified, and a new one fails
  ``test_every_docstring_literal_block_is_classified`` until it is:

  - ``PYTHON``: a code example, executed from the docstring's own text (placeholder names bound to small tensors;
    an elided ``...`` argument filled from ``FILL``, whose snippets must still be in the text), and what its
    comments promise (shapes, dtypes, keys, ranking) is checked;
  - ``COMMANDS``: command lines, parsed by the real argparse parsers; the cheap ones are also run;
  - ``NOT_CODE``: formulas, file layouts, request schemas, each checked against what the code writes or
    accepts, or pointing to the test that covers it;
* the documented commands that are cheap with tiny settings run for real (the baseline command of
  docs/training.md; ``index`` + ``search`` without warnings; the trainer's docstring commands and ``evaluate``
  under ``-m slow``);
* prose claims found wrong in the docs review each get a regression test (``test_regression_*``).
"""
from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import functools
import glob
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import aladin_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
DOCSTRING_DIRS = ("aladin_fast", "kernels")
CHILD_TIMEOUT_S = 300

# tiny TrainConfig settings (a few seconds on 2 cores), used where an example elides its arguments with "..."
TINY_TRAIN = dict(teacher_dim=16, teacher_layers=1, teacher_heads=2, teacher_ff_dim=32, student_dim=8,
                  student_heads=2, student_epochs=1, teacher_epochs=1, baseline_epochs=1, batch_size=16,
                  one_caption_per_image=True, warmup_steps=1, progress=False)
TINY_FLAGS = ["--synthetic-train-images", "24", "--synthetic-val-images", "8", "--synthetic-feature-dim", "16",
              "--teacher-dim", "16", "--teacher-layers", "1", "--teacher-heads", "2", "--teacher-ff-dim", "32",
              "--student-dim", "8", "--student-heads", "2", "--batch-size", "16", "--one-caption-per-image", "true",
              "--teacher-epochs", "1", "--student-epochs", "1", "--baseline-epochs", "1", "--warmup-steps", "1",
              "--progress", "false"]


# ------------------------------------------------------------------ extraction

def _read(relative: str) -> str:
    with open(os.path.join(ROOT, relative), encoding="utf-8") as handle:
        return handle.read()


_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _fenced_blocks():
    """``[(doc, index among the doc's blocks of that language, language, body)]``."""
    blocks = []
    for doc in DOC_FILES:
        seen: dict = {}
        for language, body in _FENCE.findall(_read(doc)):
            blocks.append((doc, seen.get(language, 0), language, body))
            seen[language] = seen.get(language, 0) + 1
    return blocks


def _literal_blocks(doc: str):
    """The reStructuredText literal blocks of a (cleaned) docstring: the indented text after a line ending "::"."""
    lines, blocks, i = doc.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].rstrip().endswith("::"):
            i += 1
            continue
        base = len(lines[i]) - len(lines[i].lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        body = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base):
            body.append(lines[j])
            j += 1
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
        i = j
    return blocks


@functools.lru_cache(maxsize=None)
def _docstring_blocks():
    """``{"path:owner:n": block}`` for every literal block in a docstring of aladin_fast/ or kernels/ (read with
    ast, nothing imported; owner is ``<module>`` or the function / class name)."""
    found = {}
    for folder in DOCSTRING_DIRS:
        for path in sorted(glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)):
            relative = os.path.relpath(path, ROOT)
            tree = ast.parse(_read(relative))
            owners = [(tree, "<module>")] + [
                (node, node.name) for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
            for node, owner in owners:
                doc = ast.get_docstring(node)
                for n, block in enumerate(_literal_blocks(doc or "")):
                    found[f"{relative}:{owner}:{n}"] = block
    return found


def _block(key: str) -> str:
    return _docstring_blocks()[key]  # the cached dict: callers never modify it


def _filled(key: str) -> str:
    """The example's text with each elided argument replaced (the snippet must still be in the docstring)."""
    text = _block(key)
    for old, new in FILL.get(key, ()):
        assert old in text, f"{key}: the docstring no longer contains {old!r}; update FILL"
        text = text.replace(old, new)
    return text


# every literal block of a docstring, by kind
PYTHON = {
    "aladin_fast/__init__.py:<module>:0": "test_package_api_synopsis",
    "aladin_fast/retrieval/__init__.py:<module>:0": "test_retrieval_example",
    "aladin_fast/training/__init__.py:<module>:0": "test_training_package_example",
    "aladin_fast/training/trainer.py:Trainer:0": "test_trainer_example_as_written (slow)",
    "aladin_fast/serving/config.py:<module>:0": "test_serving_config_example",
    "aladin_fast/serving/server.py:<module>:0": "test_server_thread_example",
    "aladin_fast/serving/batcher.py:<module>:0": "test_batcher_example",
}
COMMANDS = {
    "aladin_fast/evaluate.py:<module>:0": "parsed; run by test_training_commands_and_evaluate (slow)",
    "aladin_fast/training/command.py:<module>:0": "parsed; run by test_training_commands_and_evaluate (slow)",
    "aladin_fast/serving/__init__.py:<module>:0": "parsed; its curl body is sent by test_server_thread_example",
}
NOT_CODE = {
    "aladin_fast/losses.py:hinge_loss:0": "formula: tests/test_loss_properties.py checks hinge_loss against it",
    "aladin_fast/training/checkpoint.py:<module>:0": "file layout: test_checkpoint_layout_is_what_save_writes",
    "aladin_fast/retrieval/manifest.py:<module>:0": "directory layout: test_retrieval_example",
    "aladin_fast/serving/schema.py:<module>:0": "tensor encoding: test_request_schemas_list_the_accepted_fields",
    "aladin_fast/serving/schema.py:<module>:1": "/search body: test_request_schemas_list_the_accepted_fields",
    "aladin_fast/serving/schema.py:<module>:2": "/rerank body: test_request_schemas_list_the_accepted_fields",
    "kernels/alignment_weights.py:<module>:0": "kernel math: tests/test_triton_backward.py",
    "kernels/alignment_winner_gemm.py:<module>:0": "kernel math: tests/test_triton_backward.py",
    "kernels/alignment_gather.py:<module>:0": "kernel math: tests/test_triton_backward.py",
}
FILL = {
    "aladin_fast/training/__init__.py:<module>:0": [("TrainConfig(...)", "TrainConfig(**TINY_TRAIN)")],
    "aladin_fast/training/trainer.py:Trainer:0": [(
        "TrainConfig(teacher_dim=128, ...)",
        "TrainConfig(teacher_dim=128, teacher_layers=1, teacher_heads=2, student_dim=32, student_heads=2, "
        "teacher_epochs=1, student_epochs=1, one_caption_per_image=True, progress=False)")],
    "aladin_fast/serving/server.py:<module>:0": [("json=...", "json=BODY")],
}
RUN_ELSEWHERE = {("README.md", 0): "tests/test_readme.py"}  # (doc, index of its python blocks): the test running it


# ------------------------------------------------------------------ the fenced blocks of the docs

def test_every_fenced_block_is_bash_or_python():
    blocks = _fenced_blocks()
    assert len(blocks) >= 6, blocks  # README: 3, training.md: 2, reliability.md: 1 when this was written
    assert {language for _, _, language, _ in blocks} <= {"bash", "python"}, \
        [(doc, language) for doc, _, language, _ in blocks if language not in ("bash", "python")]


def test_fenced_python_blocks_run():
    python = [(doc, n, body) for doc, n, language, body in _fenced_blocks() if language == "python"]
    assert len(python) >= 1
    for (doc, n), test_file in RUN_ELSEWHERE.items():
        assert any(d == doc and i == n for d, i, _ in python), f"{doc} has no python block {n} any more"
        assert '_blocks("python")' in _read(test_file), f"{test_file} no longer runs {doc}'s python block {n}"
    for doc, n, body in python:
        if (doc, n) in RUN_ELSEWHERE:
            continue
        result = subprocess.run([sys.executable, "-c", body], cwd=ROOT, capture_output=True, text=True,
                                timeout=CHILD_TIMEOUT_S)
        assert result.returncode == 0, f"{doc}, python block {n}:\n{result.stderr[-3000:]}"


# ------------------------------------------------------------------ docstring literal blocks

def test_every_docstring_literal_block_is_classified():
    found = dict(_docstring_blocks())
    assert len(found) >= 19, sorted(found)  # 19 when this was written
    classified = {**PYTHON, **COMMANDS, **NOT_CODE}
    assert len(classified) == len(PYTHON) + len(COMMANDS) + len(NOT_CODE)  # no key in two kinds
    assert set(found) == set(classified), (
        f"unclassified: {sorted(set(found) - set(classified))}; stale: {sorted(set(classified) - set(found))}")
    assert set(FILL) <= set(PYTHON)


def _command_lines(block: str):
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_docstring_command_lines_parse():
    from test_docs_consistency import _aladin_parser, _parse

    from aladin_fast.training import command

    checked = 0
    for key in COMMANDS:
        for line in _command_lines(_block(key)):
            tokens = shlex.split(line)
            if tokens[0] == "curl":
                url = [token for token in tokens if token.startswith("localhost:")]
                assert url and url[0].endswith("/search"), line
                continue
            if tokens[0] == "torchrun":  # torchrun's own options, then "-m module"
                tokens = ["python"] + tokens[tokens.index("-m"):]
            assert tokens[:2] == ["python", "-m"], line
            if tokens[2] == "aladin_fast.training":
                parser, argv = command.build_parser(), tokens[3:]
            else:
                assert tokens[2] == "aladin_fast", line
                parser, argv, options = _aladin_parser(tokens[3:])
                assert options is not None, line
            assert _parse(parser, argv) is None, (key, line, _parse(parser, argv))
            checked += 1
    assert checked >= 7, checked


# ------------------------------------------------------------------ the Python examples of the docstrings

def test_package_api_synopsis():
    """``aladin_fast``'s docstring lists the functional API with the shape each call returns."""
    torch.manual_seed(0)
    n, k = 3, 2
    names = dict(aladin_fast=aladin_fast, text=torch.randn(n, 4, 8), images=torch.randn(n, 5, 8),
                 candidates=torch.tensor([[2, 0], [1, 1], [0, 2]]))
    sizes = {"Nt": n, "Ni": n, "N": n, "K": k}
    lines = _block("aladin_fast/__init__.py:<module>:0").splitlines()
    assert len(lines) >= 6
    for line in lines:
        code, _, comment = line.partition("#")
        code = code.strip().replace(", ...", "").replace("..., ", "")
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            value = eval(code, names)  # noqa: S307 - our own docstring
        shape = re.match(r"\s*\[([\w, ]+)\]", comment)
        if shape:
            assert tuple(value.shape) == tuple(sizes[s.strip()] for s in shape.group(1).split(",")), line
            assert value.dtype == torch.float32, line
        elif "streamed" in comment:
            torch.testing.assert_close(value, aladin_fast.alignment_scores(names["text"], names["images"]))
        elif "spec" in comment:
            assert value is aladin_fast.reference
        else:
            assert "backends" in comment and {"backend.cpu", "backend.reference", "backend.triton"} <= set(value)
            assert "backend.cpu" in printed.getvalue()


def test_retrieval_example(tmp_path, monkeypatch):
    """The retrieval package's example as written (placeholders bound to small tensors): text -> image hits,
    best first, equal to the exhaustive teacher when ``rerank_k`` covers the gallery, saved atomically and
    loaded back; the index kinds its comment names exist; the saved layout is manifest.py's."""
    from aladin_fast.retrieval import Retriever, StudentIndex

    torch.manual_seed(0)
    E, D, Ni, R, Nq, W = 16, 8, 40, 6, 3, 5
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape), dim=-1)  # noqa: E731
    names = dict(E=E, D=D, image_embeddings=unit(Ni, E), ids=torch.arange(Ni, dtype=torch.int64) * 7 + 3,
                 image_regions=unit(Ni, R, D), region_lengths=torch.randint(1, R + 1, (Ni,)),
                 caption_embeddings=unit(Nq, E), caption_words=unit(Nq, W, D), word_lengths=torch.tensor([5, 2, 1]))
    gallery_ids = names["ids"].clone()
    monkeypatch.chdir(tmp_path)
    example = _block("aladin_fast/retrieval/__init__.py:<module>:0")
    exec(compile(example, "retrieval example", "exec"), names)  # noqa: S102 - our own docstring
    ids, scores = names["ids"], names["scores"]
    assert ids.shape == scores.shape == (Nq, 10) and ids.dtype == torch.int64 and scores.dtype == torch.float32
    assert bool(torch.isin(ids, gallery_ids).all()) and bool((scores[:, :-1] >= scores[:, 1:]).all())
    retriever = names["retriever"]
    assert retriever.student_index.factory_string == "Flat"  # "exact IndexFlatIP"
    exhaustive_ids, exhaustive_scores = retriever.search_exhaustive(names["caption_words"], names["word_lengths"], k=10)
    assert torch.equal(ids, exhaustive_ids) and torch.equal(scores, exhaustive_scores)  # rerank_k=100 >= 40 images
    loaded_ids, loaded_scores = Retriever.load("gallery/").search(
        names["caption_embeddings"], names["caption_words"], names["word_lengths"], k=10, rerank_k=100)
    assert torch.equal(loaded_ids, ids) and torch.equal(loaded_scores, scores)
    for kind in re.findall(r'"(\w+)"', example.split("IndexFlatIP")[1].splitlines()[0]):
        assert StudentIndex(dim=E, index=kind).factory_string, kind
    # manifest.py's layout: the commit point, one payload folder, the lock file
    layout = _block("aladin_fast/retrieval/manifest.py:<module>:0")
    manifest_names = re.findall(r"path/(\S+?)(?:<hex>/\.\.\.)?\s", layout)
    assert manifest_names == ["manifest.json", "payload-", ".lock"], manifest_names
    entries = sorted(os.listdir("gallery"))
    assert entries[:2] == [".lock", "manifest.json"] and len(entries) == 3
    assert re.fullmatch(r"payload-[0-9a-f]+", entries[2]), entries


@pytest.fixture(scope="module")
def tiny_trainer():
    """The training package's example (``Trainer(TrainConfig(...), train_data, val_data); trainer.fit()``) with
    tiny data and settings, run once for the tests that read its results."""
    from aladin_fast.data import SyntheticScenes

    torch.manual_seed(0)  # the example imports Trainer and TrainConfig itself
    names = dict(TINY_TRAIN=TINY_TRAIN, train_data=SyntheticScenes(24, regions=19, feature_dim=16),
                 val_data=SyntheticScenes(8, seed=1, regions=19, feature_dim=16))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        example = _filled("aladin_fast/training/__init__.py:<module>:0")
        exec(compile(example, "training example", "exec"), names)  # noqa: S102 - our own docstring
    finally:
        torch.set_num_threads(threads)
    return names["trainer"]


def test_training_package_example(tiny_trainer):
    """``fit()`` runs the configured stages, by default the teacher, then the student (Trainer's docstring);
    ``evaluate(model="student")`` gives the metrics its comment names; no baseline unless configured."""
    stages = [record["stage"] for record in tiny_trainer.history if record.get("kind") == "stage"]
    assert stages == ["teacher", "student"]
    metrics = tiny_trainer.evaluate(model="student")
    assert {"i2t_r1", "rsum"} <= set(metrics) and 0 <= metrics["rsum"] <= 600
    assert tiny_trainer.baseline is None


def test_checkpoint_layout_is_what_save_writes(tiny_trainer, tmp_path):
    """checkpoint.py's table names every key of a saved checkpoint, and every key of its ``progress``."""
    layout = _block("aladin_fast/training/checkpoint.py:<module>:0")
    path = str(tmp_path / "checkpoint.pt")
    tiny_trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    documented = set()
    for line in layout.splitlines():
        if line and not line[0].isspace():
            documented.update(part.strip() for part in re.match(r"([\w /]+?)\s{2,}", line).group(1).split("/"))
    assert documented == set(saved), (sorted(documented ^ set(saved)))
    progress = set(re.findall(r'"(\w+)"', layout.split("progress", 1)[1].split("}", 1)[0]))
    assert progress == set(saved["progress"]), sorted(progress ^ set(saved["progress"]))
    assert saved["format"] == re.search(r'format\s+"([\w.]+)"', layout).group(1)


@pytest.mark.slow
def test_trainer_example_as_written():
    """Trainer's docstring example with its own data sizes (600 / 100 scenes at the default 2048 features); the
    elided config is tiny. About 30 s on 2 cores."""
    from aladin_fast.data import SyntheticScenes
    from aladin_fast.training import TrainConfig, Trainer

    names = dict(Trainer=Trainer, TrainConfig=TrainConfig, SyntheticScenes=SyntheticScenes)
    lines = _filled("aladin_fast/training/trainer.py:Trainer:0").splitlines()
    torch.manual_seed(0)
    exec(compile("\n".join(lines[:-1]), "Trainer example", "exec"), names)  # noqa: S102
    metrics = eval(lines[-1].split("#")[0], names)  # noqa: S307 - the last line's value: the metrics
    assert {"i2t_r1", "rsum"} <= set(metrics) and 0 <= metrics["rsum"] <= 600


# ------------------------------------------------------------------ serving examples

@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A small text -> image Retriever saved as ``gallery/`` (what the serving examples load)."""
    from aladin_fast.retrieval import FeatureStore, Retriever, StudentIndex

    root = tmp_path_factory.mktemp("serving")
    generator = torch.Generator().manual_seed(0)
    ids = torch.arange(12, dtype=torch.int64)
    index = StudentIndex(dim=8)
    index.add(torch.nn.functional.normalize(torch.randn(12, 8, generator=generator), dim=-1), ids)
    store = FeatureStore(dim=4)
    store.append(ids, torch.randn(12, 3, 4, generator=generator), torch.randint(1, 4, (12,), generator=generator))
    Retriever(index, store).save(str(root / "gallery"))
    return root


def test_serving_config_example(gallery, monkeypatch):
    from aladin_fast.serving import ServingConfig, create_app

    monkeypatch.chdir(gallery)
    names = dict(ServingConfig=ServingConfig, create_app=create_app)
    example = _block("aladin_fast/serving/config.py:<module>:0")
    exec(compile(example, "serving config example", "exec"), names)  # noqa: S102 - our own docstring
    config = names["config"]
    assert (config.retriever_paths, config.max_batch_size, config.max_wait_ms) == (["gallery/"], 64, 2.0)
    assert type(names["app"]).__name__ == "FastAPI"


def _curl_body() -> dict:
    """The JSON body of the serving package's curl line, its elided values filled: the query is gallery item 5."""
    curl = [line for line in _block("aladin_fast/serving/__init__.py:<module>:0").splitlines() if "curl" in line]
    text = shlex.split(curl[0])[shlex.split(curl[0]).index("-d") + 1]
    body = json.loads(text.replace("[[...], ...]", "[]").replace("[...]", "[]"))
    assert set(body) == {"query_embedding", "query_tokens", "k"}, body
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(12, 8, generator=generator), dim=-1)
    body.update(query_embedding=embeddings[5].tolist(), query_tokens=torch.randn(2, 4, generator=generator).tolist())
    return body


def test_server_thread_example(gallery, monkeypatch):
    """server.py's example (``with ServerThread(...) as server: requests.post(...)``) with the serving package's
    curl body: a 200 with ``k`` hits, the same as the Retriever's own search."""
    requests = pytest.importorskip("requests")
    from aladin_fast.retrieval import Retriever
    from aladin_fast.serving import ServerThread, ServingConfig

    monkeypatch.chdir(gallery)
    body = _curl_body()
    code = _filled("aladin_fast/serving/server.py:<module>:0").replace(
        "requests.post(", "response = requests.post(")
    names = dict(ServerThread=ServerThread, ServingConfig=ServingConfig, requests=requests, BODY=body)
    exec(compile(code, "server example", "exec"), names)  # noqa: S102
    response = names["response"]
    assert response.status_code == 200, response.text
    answer = response.json()
    ids, scores = Retriever.load("gallery/").search(
        torch.tensor([body["query_embedding"]]), torch.tensor([body["query_tokens"]]), k=body["k"])
    expected = [i for i in ids[0].tolist() if i >= 0]
    assert answer["ids"] == expected and len(expected) == min(body["k"], 12)
    assert answer["scores"] == pytest.approx(scores[0, :len(expected)].tolist())


def test_batcher_example(gallery, monkeypatch):
    """batcher.py's example, run inside an event loop as its comment says; the answer equals a lone
    ``run_search_batch`` call."""
    from aladin_fast.serving import DynamicBatcher, MetricsRegistry, ServingConfig, load_gallery, run_search_batch
    from aladin_fast.serving.engine import search_batch_key
    from aladin_fast.serving.schema import parse_search

    monkeypatch.chdir(gallery)
    config = ServingConfig(retriever_paths=["gallery/"])
    snapshot = load_gallery(config.retriever_paths, generation=1)
    query = parse_search(_curl_body(), snapshot, config)
    code = "async def _example():\n" + textwrap.indent(_block("aladin_fast/serving/batcher.py:<module>:0"), "    ") \
        + "\n    return result\n"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        names = dict(DynamicBatcher=DynamicBatcher, run_search_batch=run_search_batch,
                     search_batch_key=search_batch_key, pool=pool, registry=MetricsRegistry(), query=query)
        exec(compile(code, "batcher example", "exec"), names)  # noqa: S102
        result = asyncio.run(names["_example"]())
    assert result == run_search_batch([query])[0]


def test_request_schemas_list_the_accepted_fields():
    """schema.py's three schemas: the tensor encoding is what ``encode_tensor`` writes (and ``decode_tensor``
    reads back), and the /search and /rerank bodies list exactly the fields the parsers accept."""
    from aladin_fast.serving import decode_tensor, encode_tensor
    from aladin_fast.serving import schema

    blocks = [_block(f"aladin_fast/serving/schema.py:<module>:{n}") for n in range(3)]
    fields = [set(re.findall(r'"(\w+)":', block)) for block in blocks]
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    for dtype in re.findall(r'"(float32|float16|bfloat16)"', blocks[0]):
        encoded = encode_tensor(tensor, dtype)
        assert set(encoded) == fields[0] and encoded["dtype"] == dtype and encoded["shape"] == [2, 3]
        torch.testing.assert_close(decode_tensor("query_tokens", encoded, 2).float(), tensor)
    assert fields[1] == schema._SEARCH_FIELDS
    assert fields[2] == schema._RERANK_FIELDS


# ------------------------------------------------------------------ documented commands, run

def test_baseline_command_of_training_md_runs(tmp_path, monkeypatch, capsys):
    """docs/training.md: ``python -m aladin_fast train --stages baseline --baseline-pooling max ...`` trains the
    global-embedding baseline alone ("no teacher"), prints the final metrics as JSON and writes its run folder."""
    from aladin_fast import cli

    (line,) = [line for doc, _, language, body in _fenced_blocks() if doc == "docs/training.md" and language == "bash"
               for line in body.replace("\\\n", " ").splitlines() if "--stages baseline" in line]
    argv = shlex.split(line.split(" #")[0])[3:]
    assert argv[:3] == ["train", "--stages", "baseline"] and "--output-dir" in argv
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(argv + TINY_FLAGS) == 0
    finally:
        torch.set_num_threads(threads)
    final = json.loads(capsys.readouterr().out)
    assert final["model"] == "baseline" and "rsum" in final
    out = argv[argv.index("--output-dir") + 1]
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    stages = [record for record in records if record["kind"] == "stage"]
    assert [record["stage"] for record in stages] == ["baseline"]
    assert {"epochs", "steps", "seconds", "cpu_seconds", "budget_seconds", "wall_start", "wall_end"} <= set(stages[0])
    hparams = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["baseline"]["hparams"]
    assert (hparams["pooling"], hparams["layers"], hparams["backbone"]) == ("max", 0, "separate")


@pytest.fixture(scope="module")
def npy_gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("npy")
    rng = np.random.default_rng(0)
    for name, shape in (("emb", (6, 8)), ("tok", (6, 3, 4)), ("qemb", (2, 8)), ("qtok", (2, 5, 4))):
        np.save(root / f"{name}.npy", rng.standard_normal(shape).astype(np.float32))
    return root


def test_regression_search_command_prints_no_warning(npy_gallery):
    """Was: ``python -m aladin_fast search`` printed torch's "The given NumPy array is not writable" UserWarning
    on every run (``torch.from_numpy`` of np.load's read-only memory maps); ``index`` had been fixed already.
    A child process: torch shows that warning once per process."""
    from aladin_fast.retrieval.cli import main as retrieval_main

    with contextlib.redirect_stdout(io.StringIO()):
        assert retrieval_main(["index", "--embeddings", str(npy_gallery / "emb.npy"), "--tokens",
                               str(npy_gallery / "tok.npy"), "--out", str(npy_gallery / "gallery")]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "aladin_fast", "search", "--retriever", "gallery", "--query-embeddings", "qemb.npy",
         "--query-tokens", "qtok.npy", "--k", "3"],
        cwd=npy_gallery, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    payload = json.loads(result.stdout)
    assert len(payload["ids"]) == 2 and all(len(row) == 3 for row in payload["ids"])


@pytest.mark.slow
def test_training_commands_and_evaluate(tmp_path, monkeypatch, capsys):
    """command.py's examples (train into runs/small, stop, resume from its checkpoint) and evaluate.py's
    ``evaluate --checkpoint ... --data data/coco_precomp --split test``, with tiny sizes in place of the
    illustrative ones (2,000 images, D = 256)."""
    from aladin_fast import cli
    from aladin_fast.data import SyntheticScenes, save_precomp
    from aladin_fast.training import command

    monkeypatch.chdir(tmp_path)
    lines = _command_lines(_block("aladin_fast/training/command.py:<module>:0"))
    (first,) = [line for line in lines if "--output-dir runs/small" in line]
    (resume,) = [line for line in lines if "--resume runs/small/checkpoint.pt" in line]
    tiny = TINY_FLAGS + ["--teacher-epochs", "2"]
    argv = [t for t in shlex.split(first)[3:]]
    for flag in ("--synthetic-train-images", "--teacher-dim"):  # the illustrative sizes
        del argv[argv.index(flag):argv.index(flag) + 2]
    assert command.main(argv + tiny + ["--max-epochs", "1"]) == 0
    capsys.readouterr()
    with open("run.toml", "w", encoding="utf-8") as handle:  # the config the resume line names: the same run
        handle.write("[train]\noutput_dir = \"runs/small\"\n")
    assert command.main(shlex.split(resume)[3:] + tiny) == 0
    final = json.loads(capsys.readouterr().out)
    assert final["model"] == "student"
    stages = [json.loads(line)["stage"] for line in open("runs/small/metrics.jsonl", encoding="utf-8")
              if '"kind": "stage"' in line]
    assert stages == ["teacher", "student"]
    scenes = SyntheticScenes(8, seed=3, regions=19, feature_dim=16)
    save_precomp("data/coco_precomp", "test", scenes.image_features, scenes.captions)
    (evaluate,) = _command_lines(_block("aladin_fast/evaluate.py:<module>:0"))
    evaluate = evaluate.replace("run/checkpoint.pt", "runs/small/checkpoint.pt")
    assert cli.main(shlex.split(evaluate)[3:]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {"teacher", "student", "two_stage"} <= set(results["scorers"])


# ------------------------------------------------------------------ prose claims fixed in the docs review

def test_regression_full_scores_keeps_float64():
    """Was: ``full_scores`` rounded float64 scores to float32 (its output buffer was float32), against the
    README's "float64 with backend='reference' or 'cpu', in float64 throughout" that every other entry point
    keeps; the top-k values too."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(5, 3, 4, generator=generator, dtype=torch.float64)
    images = torch.randn(7, 2, 4, generator=generator, dtype=torch.float64)
    for backend in ("cpu", "reference"):
        direct = aladin_fast.alignment_scores(text, images, backend=backend)
        streamed = aladin_fast.full_scores(text, images, chunk=2, image_chunk=3, backend=backend)
        assert direct.dtype == streamed.dtype == torch.float64
        # the C++ kernel scores each pair alone (same bits in any chunk); the reference's batched matmuls may
        # differ in the last bit between block shapes: float64 rounding, 1e-15, where float32 was 1e-7
        torch.testing.assert_close(streamed, direct, rtol=1e-14, atol=1e-14)
        assert backend != "cpu" or torch.equal(streamed, direct)
        values, indices = aladin_fast.full_scores(text, images, chunk=2, image_chunk=3, topk=3, backend=backend)
        assert values.dtype == torch.float64
        torch.testing.assert_close(values, direct.gather(1, indices), rtol=1e-14, atol=1e-14)
    assert aladin_fast.full_scores(text.float(), images.float()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"out must be float64 \[5, 7\]"):
        aladin_fast.full_scores(text, images, out=torch.empty(5, 7))


def test_regression_demo_help_says_what_the_demo_does():
    """Was: ``aladin_fast demo`` was described as "score synthetic data with every available backend and time
    it" and ``--quick`` as "a few seconds"; the demo trains, distils, indexes and evaluates, and the quick run
    takes about a minute (demo.py's docstring; 48 s measured on the 2-core machine)."""
    from test_docs_consistency import _subparser

    from aladin_fast import cli, demo

    parser = cli._build_parser()
    choices = [action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction"][0]
    summary = {action.dest: action.help for action in choices._choices_actions}["demo"]
    assert all(word in summary for word in ("train", "distil", "index", "evaluate")), summary
    quick = [action.help for action in _subparser(parser, "demo")._actions if "--quick" in action.option_strings][0]
    assert re.search(r"``quick``\s+about 1 minute", demo.__doc__) and "minute" in quick, quick


def test_regression_oracle_phrase_features_are_means_not_unit_vectors():
    """Was: documented as "unit concept vectors" next to "(cube + small + red) / 3", which has norm 0.58: each
    phrase token is the mean of its concepts' one-hot vectors (components summing to 1)."""
    from aladin_fast.data import SyntheticScenes

    doc = SyntheticScenes.oracle_phrase_features.__doc__
    assert "unit concept vectors" not in doc and "summing to 1" in doc
    features, lengths = SyntheticScenes(4, regions=19, feature_dim=16).oracle_phrase_features()
    valid = torch.arange(features.shape[1])[None, :] < lengths[:, None]
    torch.testing.assert_close(features.sum(-1)[valid], torch.ones(int(valid.sum())))
    assert features[~valid].abs().sum() == 0
    assert (features.count_nonzero(-1)[valid] > 1).any()  # some phrases carry attributes: norm below 1


def test_regression_ivf_nlist_default_is_capped_by_the_training_set():
    """Was: "nlist: default ~4 sqrt(N)"; with N = 400 that is 80 lists, but the code caps it at N // 39 (faiss's
    39 points per centroid): 10."""
    from aladin_fast.retrieval import StudentIndex

    index = StudentIndex(dim=8, index="ivf")
    index.add(torch.nn.functional.normalize(torch.randn(400, 8), dim=-1), torch.arange(400))
    assert index.factory_string == "IVF10,Flat"
    assert "N // 39" in StudentIndex.__doc__
