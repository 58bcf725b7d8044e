"""The README and the CLI agree: every command and option the README names exists."""

import re
from pathlib import Path

import pytest
import typer
from toss_mlx_cli.main import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def command_table() -> list[tuple[str, str]]:
    """(command cell, description cell) of each row of the README's command table."""
    section = README.split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 2 and cells[0].startswith("`toss-mlx "):
            rows.append((cells[0], cells[1]))
    return rows


def resolve(words: list[str]):
    """Walk the subcommand words (lower-case, not options or placeholders) down the app."""
    command = typer.main.get_command(app)
    path = []
    for word in words:
        if word not in getattr(command, "commands", {}):  # a group's subcommands
            break
        command, path = command.commands[word], path + [word]
    return command, path


def options_of(command) -> set[str]:
    return {opt for p in command.params for opt in p.opts + p.secondary_opts if opt.startswith("--")}


ROWS = command_table()


def test_the_table_was_found():
    assert len(ROWS) >= 12
    assert "`toss-mlx refine " in "".join(cell for cell, _ in ROWS)


@pytest.mark.parametrize("cell,description", ROWS, ids=[r[0].split("`")[1][:30] for r in ROWS])
def test_every_command_and_option_in_the_table_exists(cell, description):
    words = cell.strip("`").split()[1:]
    command, path = resolve(words)
    assert path, f"{cell}: no such command"
    # The command words come right after `toss-mlx`; what follows is options and placeholders.
    rest = words[len(path):]
    assert not rest or not re.fullmatch(r"[a-z][a-z-]*", rest[0]), f"{cell}: unknown subcommand {rest[0]}"
    named = set(OPTION.findall(cell + " " + description))
    missing = sorted(named - options_of(command))
    assert not missing, f"toss-mlx {' '.join(path)} has no {', '.join(missing)}"


@pytest.mark.parametrize("command", ["train", "refine"])
def test_the_data_sections_flags_exist_on_the_data_commands(command):
    section = README.split("## Data", 1)[1].split("\n## ", 1)[0]
    named = set(OPTION.findall(section)) - {"--mask-prompt"}  # mlx-lm's flag, named for contrast
    assert {"--format", "--skip-bad-rows", "--template"} <= named
    missing = sorted(named - options_of(resolve([command])[0]))
    assert not missing, f"toss-mlx {command} has no {', '.join(missing)}"


def test_refine_and_train_spell_their_shared_options_alike():
    train, refine = options_of(resolve(["train"])[0]), options_of(resolve(["refine"])[0])
    for flag in ("--iters", "--epochs", "--rank", "--batch-size", "--lr", "--alpha", "--num-layers",
                 "--format", "--skip-bad-rows", "--config", "--set", "--max-seq-len", "--template"):
        assert flag in train and flag in refine, flag
