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
    assert {"demo", "extract", "info", "bases", "train", "compare", "finetune", "predict", "export", "merge"} <= used


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    name, *rest = shlex.split(command)[1:]
    sub = cli.commands.get(name)
    assert sub is not None, f"README names a command featcache does not have: {command}"
    try:
        sub.make_context(name, rest)
    except click.UsageError as exc:
        pytest.fail(f"README command does not parse: {command}\n{exc.format_message()}")
