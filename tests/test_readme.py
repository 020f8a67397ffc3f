"""Every ```python block of README.md runs as written.

Each block runs in a fresh namespace, in its own copy of a folder laid out like the repository
(`samples/`, `README.md`) plus the files the README's examples name (`ckpt/b16-224`, `photos/`,
`pets/captions.jsonl`). The one change made to a block is the model path: the hub id becomes the small
random checkpoint of `conftest.fixres` (no test may download). Marks on the line before a fence:
- `<!-- readme-test: serve -->`: the block needs a live server; the server tests run it, this file skips it
  (and the blocks that continue it).
- `<!-- readme-test: continue -->`: the block continues the one before it in the same section (the README
  says so in its text): it runs after it, in the same namespace and folder.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).parents[1]
HUB_ID = "google/siglip2-base-patch16-224"
SERVE_MARK = "<!-- readme-test: serve -->"
CONTINUE_MARK = "<!-- readme-test: continue -->"


@dataclasses.dataclass(frozen=True)
class Block:
    section: str     # the `## ` heading above it
    line: int        # of the opening fence, counting from 1
    code: str
    mark: str        # the line before the fence if it is a mark (SERVE_MARK, CONTINUE_MARK), else ""


def python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a markdown text, in order."""
    blocks, section, previous, lines = [], "", "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            mark = previous if previous.startswith("<!-- readme-test:") else ""
            blocks.append(Block(section, i + 1, "\n".join(lines[i + 1:end]) + "\n", mark))
            i = end
        if line.strip():
            previous = line.strip()
        i += 1
    return blocks


def runs(blocks: list[Block]) -> list[list[Block]]:
    """The blocks as runs: a block and the blocks that continue it (a run starting with a serve block is
    the server tests' to run)."""
    grouped = []
    for block in blocks:
        if block.mark == CONTINUE_MARK:
            assert grouped and grouped[-1][-1].section == block.section, \
                f"README.md:{block.line}: {CONTINUE_MARK} without a block before it in its section"
            grouped[-1].append(block)
        else:
            assert block.mark in ("", SERVE_MARK), f"README.md:{block.line}: unknown mark {block.mark}"
            grouped.append([block])
    return grouped


def needs_server(run: list[Block]) -> bool:
    return run[0].mark == SERVE_MARK


RUNS = runs(python_blocks((ROOT / "README.md").read_text()))


def test_blocks_are_found_and_only_serve_blocks_skipped():
    text = ("## A\n```python\nx = 1\n```\n" + SERVE_MARK + "\n\n```python\nserve()\n```\n" + CONTINUE_MARK
            + "\n```python\nx += 1\n```\n## B\ntext\n```python\ny = 2\n```\n")
    blocks = python_blocks(text)
    assert [(b.section, b.line, b.code, b.mark) for b in blocks] == [
        ("A", 2, "x = 1\n", ""), ("A", 7, "serve()\n", SERVE_MARK), ("A", 11, "x += 1\n", CONTINUE_MARK),
        ("B", 16, "y = 2\n", "")]
    assert [([b.line for b in run], needs_server(run)) for run in runs(blocks)] == [
        ([2], False), ([7, 11], True), ([16], False)]
    assert sum(len(run) for run in RUNS if not needs_server(run)) >= 6  # the README has not lost its examples


@pytest.fixture(scope="module")
def layout(fixres, tmp_path_factory):
    """The folder each block starts from (copied per block: blocks write files)."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "samples", root / "samples")
    shutil.copy(ROOT / "README.md", root / "README.md")
    (root / "ckpt").mkdir()
    (root / "ckpt" / "b16-224").symlink_to(fixres[1], target_is_directory=True)
    (root / "photos").mkdir()
    for name in ("cat.jpg", "coffee.jpg"):
        shutil.copy(ROOT / "samples" / name, root / "photos" / name)
    (root / "pets").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (color, rgb) in enumerate([("red", (220, 30, 30)), ("green", (30, 200, 60)), ("blue", (40, 60, 220))] * 4):
        pixels = np.clip(np.asarray(rgb) + rng.integers(-20, 20, (64, 80, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "pets" / f"{i:02d}.png")
        rows.append(f'{{"image": "{i:02d}.png", "caption": "a {color} picture"}}\n')
    (root / "pets" / "captions.jsonl").write_text("".join(rows))
    return root


SERVER_ONLY = pytest.mark.skip(reason="needs a live server: the server tests run it")


@pytest.mark.parametrize("run", [pytest.param(run, marks=[SERVER_ONLY] if needs_server(run) else []) for run in RUNS],
                         ids=lambda run: "README.md:" + "+".join(str(b.line) for b in run))
def test_readme_python_blocks_run(run, layout, fixres, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(layout, work, symlinks=True)
    monkeypatch.chdir(work)
    namespace = {"__name__": "__readme__"}
    for block in run:
        code = block.code.replace(f'"{HUB_ID}"', repr(str(fixres[1])))  # the one change: the model path
        exec(compile(code, f"README.md:{block.line} ({block.section})", "exec"), namespace)


def test_classify_output_shown_is_what_the_tiny_checkpoint_prints(tmp_path, monkeypatch, capsys):
    """`## Use` shows the output of `classify` on the `ckpt/tiny-random` that `## Set up` makes, as real
    output: the recipe run here, then the command. (Its vocabulary was learned from README.md itself, so
    every edit of the README changed the figures.)"""
    from siglip2_jax.cli import main

    text = (ROOT / "README.md").read_text()
    console = re.search(r"```console\n\$ (siglip2-jax classify ckpt/tiny-random .*?)\n(.*?)```", text, re.S)
    command, shown = console.groups()
    recipe = next(block for block in python_blocks(text) if 'convert("hf/tiny-random"' in block.code)
    shutil.copytree(ROOT / "samples", tmp_path / "samples")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    monkeypatch.chdir(tmp_path)
    exec(compile(recipe.code, f"README.md:{recipe.line}", "exec"), {"__name__": "__readme__"})
    capsys.readouterr()
    assert main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out == shown
