"""Every `featcache ...` command of the README and of the documentation pages (docs/*.md) parses
against the real CLI, and every Python block of them runs.

The commands that can run offline run elsewhere (the demo, extract, train, ... tests); this
test keeps the README and the docs honest about command names, options, choices and argument
counts.
"""
import re
import shlex

import click
import pytest

from conftest import REPO
from featcache.cli import cli

DOCS = REPO / "docs"
PYTHON_API_PAGE = DOCS / "python-api.md"


def doc_files() -> list:
    """README.md, then every page of docs/ in name order."""
    return [REPO / "README.md"] + sorted(DOCS.glob("*.md"))


def code_blocks(text: str, languages: tuple[str, ...]) -> list[str]:
    """The fenced blocks of a Markdown text whose info string is one of ``languages`` ("" for a
    bare fence), read fence by fence (an opening fence is never taken for a closing one)."""
    blocks, current, language = [], None, None
    for line in text.splitlines(keepends=True):
        fence = re.match(r"^```(\S*)\s*$", line)
        if current is None:
            if fence:
                current, language = [], fence.group(1)
        elif fence and not fence.group(1):
            if language in languages:
                blocks.append("".join(current))
            current = None
        else:
            current.append(line)
    return blocks


def commands_of(text: str) -> list[str]:
    commands = []
    for block in code_blocks(text, ("bash", "")):
        joined = re.sub(r"\\\n\s*", " ", block)  # shell line continuations
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line.strip().removeprefix("$ "))  # shell comments
            line = line.split("&& ")[-1]  # "pip install ... && featcache demo"
            if not line.startswith("featcache "):
                continue
            line = re.sub(r"\$\([^)]*\)", "shard.h5", line).replace("$I", "0")
            line = line.replace("<name printed above>", "NAME")
            commands.append(line)
    return commands


def readme_commands() -> list[tuple[str, str]]:
    """(file, command) for every `featcache ...` command of README.md and docs/*.md."""
    return [(path.relative_to(REPO).as_posix(), command)
            for path in doc_files() for command in commands_of(path.read_text())]


COMMANDS = readme_commands()


def test_readme_and_docs_have_the_commands_of_every_task():
    used = {shlex.split(c)[1] for _, c in COMMANDS}
    assert {"demo", "extract", "info", "bases", "train", "compare", "finetune", "predict", "export", "merge", "search",
            "ensemble", "verify", "repair"} <= used


def test_readme_alone_shows_every_task():
    used = {shlex.split(c)[1] for f, c in COMMANDS if f == "README.md"}
    assert {"demo", "extract", "train", "compare", "search", "finetune", "ensemble", "report", "predict", "export",
            "verify", "repair", "merge"} <= used


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{f}: {c}" for f, c in COMMANDS])
def test_readme_command_parses(where, command):
    name, *rest = shlex.split(command)[1:]
    sub = cli.commands.get(name)
    assert sub is not None, f"{where} names a command featcache does not have: {command}"
    try:
        sub.make_context(name, rest)
    except click.UsageError as exc:
        pytest.fail(f"{where}: command does not parse: {command}\n{exc.format_message()}")


def readme_python_blocks() -> list[tuple[str, str]]:
    """(file, block): the Python API page's blocks (one session, in order), then every other
    Python block of the README and the docs, which reads what that session made (e.g. the
    plain-h5py recipe on its features.h5, the README's example on its images/)."""
    first = [(PYTHON_API_PAGE.relative_to(REPO).as_posix(), b)
             for b in code_blocks(PYTHON_API_PAGE.read_text(), ("python",))]
    rest = [(path.relative_to(REPO).as_posix(), b) for path in doc_files() if path != PYTHON_API_PAGE
            for b in code_blocks(path.read_text(), ("python",))]
    return first + rest


def test_every_python_block_of_the_readme_and_docs_runs_as_written(tmp_path, monkeypatch):
    """The Python API page is one notebook session: its blocks run in order, in one namespace,
    in a folder holding the `images/` tree they name (small generated images and the MobileNet
    weights bundled with featcache); the README's and other pages' blocks run after it, in the
    same namespace."""
    from conftest import write_tree

    blocks = readme_python_blocks()
    assert len(blocks) >= 4 and any("featcache.extract_features" in b for _, b in blocks)
    assert any(f == "README.md" for f, _ in blocks), "the README has no Python example"
    write_tree(tmp_path / "images", per_class=10)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for i, (where, block) in enumerate(blocks):
        try:
            exec(compile(block, f"{where} python block {i + 1}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001  (name the block that failed)
            pytest.fail(f"{where} python block {i + 1} failed: {exc.__class__.__name__}: {exc}\n{block}")
    assert (tmp_path / "runs" / "dense" / "config.json").exists()
    assert (tmp_path / "runs" / "logreg" / "model.npz").exists()
