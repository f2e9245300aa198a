"""The README's code runs as written, and the commands it names exist.

* The Python example block is executed (fixed seed) and its results checked against the float64 reference:
  the shapes and dtypes its comments promise, and the scores themselves.
* Every ``make <target>`` in a bash block of the README is a target of the Makefile, and the first block is
  exactly the two set-up commands (demo, test), as the project's contract asks.
"""
from __future__ import annotations

import os
import re

import torch

import aladin_fast
from aladin_fast import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def _blocks(language: str):
    return re.findall(rf"```{language}\n(.*?)```", _readme(), flags=re.S)


def test_the_python_example_runs_and_its_results_are_right():
    (example,) = _blocks("python")
    torch.manual_seed(0)
    names: dict = {}
    exec(compile(example, "README.md", "exec"), names)  # noqa: S102 - our own README
    text, images, lengths = names["text"], names["images"], names["text_lengths"]
    assert names["scores"].shape == (128, 500) and names["scores"].dtype == torch.float32
    assert names["paired"].shape == (64,)
    assert names["rerank"].shape == (128, 100) and names["argmax"].shape == (128, 100, 32)
    expected = reference.alignment_scores(text[:16].double(), images.double(), lengths[:16])
    torch.testing.assert_close(names["scores"][:16].double(), expected, rtol=1e-5, atol=1e-4)
    top = names["top"]
    torch.testing.assert_close(names["rerank"], names["scores"].gather(1, top), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(names["paired"].double(),
                               reference.paired_scores(text[:64].double(), images[:64].double()), rtol=1e-5, atol=1e-4)
    # the argmax is the winning region of each valid word (padding words -1)
    valid = torch.arange(32)[None, :] < lengths[:, None]
    assert ((names["argmax"] >= 0) == valid[:, None, :]).all()


def test_the_readme_starts_with_the_two_commands_and_every_make_target_exists():
    blocks = _blocks("bash")
    first = [line.split("#")[0].strip() for line in blocks[0].strip().splitlines()]
    assert first == ["make demo", "make test"]
    assert _readme().lstrip().startswith("# aladin-fast\n\n```bash\nmake demo")
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as handle:
        targets = set(re.findall(r"^([A-Za-z][\w-]*):", handle.read(), flags=re.M))
    named = {target for block in blocks for target in re.findall(r"^make ([\w-]+)", block, flags=re.M)}
    assert named and named <= targets, named - targets
    assert aladin_fast.alignment_scores is not None
