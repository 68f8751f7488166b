"""Every `featcache ...` command in the README parses against the real CLI.

The commands that can run offline run elsewhere (the demo, extract, train, ... tests); this
test keeps the README honest about command names, options, choices and argument counts.
"""
import re
import shlex

import click
import pytest

from conftest import REPO
from featcache.cli import cli


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|)\n(.*?)```", text, flags=re.S):
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


COMMANDS = readme_commands()


def test_readme_has_the_commands_of_every_task():
    used = {shlex.split(c)[1] for c in COMMANDS}
    assert {"demo", "extract", "info", "bases", "train", "compare", "finetune", "predict", "export", "merge", "search",
            "ensemble", "verify", "repair"} <= used


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    name, *rest = shlex.split(command)[1:]
    sub = cli.commands.get(name)
    assert sub is not None, f"README names a command featcache does not have: {command}"
    try:
        sub.make_context(name, rest)
    except click.UsageError as exc:
        pytest.fail(f"README command does not parse: {command}\n{exc.format_message()}")


def readme_python_blocks() -> list[str]:
    """The Python section's blocks (one session, in order), then every other Python block, which
    reads what that session made (e.g. the plain-h5py recipe on its features.h5)."""
    text = (REPO / "README.md").read_text()
    start = text.index("## Python API")
    end = text.index("\n## ", start + 1)
    blocks = lambda part: re.findall(r"```python\n(.*?)```", part, flags=re.S)  # noqa: E731
    return blocks(text[start:end]) + blocks(text[:start]) + blocks(text[end:])


def test_every_python_block_of_the_readme_runs_as_written(tmp_path, monkeypatch):
    """The README's Python section is one notebook session: its blocks run in order, in one
    namespace, in a folder holding the `images/` tree they name (small generated images and
    the MobileNet weights bundled with featcache)."""
    from conftest import write_tree

    blocks = readme_python_blocks()
    assert len(blocks) >= 4 and any("featcache.extract_features" in b for b in blocks)
    write_tree(tmp_path / "images", per_class=10)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001  (name the block that failed)
            pytest.fail(f"README python block {i + 1} failed: {exc.__class__.__name__}: {exc}\n{block}")
    assert (tmp_path / "runs" / "dense" / "config.json").exists()
    assert (tmp_path / "runs" / "logreg" / "model.joblib").exists()
