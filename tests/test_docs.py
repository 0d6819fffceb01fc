"""The commands in README.md and docs/*.md stay true: every `evoformer` sub-command they use
exists and its --help exits 0, and every training command (plain, under torchrun or through
launch/torchrun.sh) names config files that exist and keys the schema knows, with values it
accepts -- so a renamed key or a moved preset fails here, not in a user's shell."""

from __future__ import annotations

import re
import shlex

import pytest

from evoformer.cli import COMMANDS, main
from evoformer.config import load_config
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = ("", "bash", "sh", "console", "shell")


def _blocks(text: str) -> list[str]:
    """The contents of the shell code blocks of a markdown text (fences paired in order)."""
    blocks, current, lang = [], None, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current, lang = [], line.strip()[3:].strip()
            else:
                if lang in SHELL:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


CONFIG_COMMANDS = ("train", "config", "inspect", "plan")


def _commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `evoformer`) for each evoformer command line in a code block."""
    found = []
    for doc in DOCS:
        for block in _blocks(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" # ")[0].split("  #")[0].strip()
                for part in re.split(r"&&|\|", line):
                    try:
                        words = shlex.split(part)
                    except ValueError:
                        continue
                    argv = _evoformer_argv(words)
                    if argv:
                        found.append((f"{doc.name}: {part.strip()}", argv))
    return found


def _evoformer_argv(words: list[str]) -> list[str] | None:
    """The arguments of an evoformer command line (``evoformer ...``, ``torchrun ... -m
    evoformer ...``, ``launch/torchrun.sh ...``); None for anything else (output, prose)."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]  # VAR=value prefixes
    if not words:
        return None
    if words[0] == "evoformer":
        return words[1:]
    if words[0] in ("torchrun", "python") and "evoformer" in words:
        at = words.index("evoformer")
        if at > 0 and words[at - 1] == "-m":
            return words[at + 1 :]
    if words[0].endswith("launch/torchrun.sh"):
        return ["train", *words[1:]]
    return None


COMMAND_LINES = _commands()


def test_the_docs_have_commands():
    assert len(COMMAND_LINES) > 20


@pytest.mark.parametrize("sub", sorted({argv[0] for _, argv in COMMAND_LINES if argv}))
def test_every_subcommand_in_the_docs_exists(sub, capsys):
    assert sub in COMMANDS, f"the docs use `evoformer {sub}`, which does not exist"
    with pytest.raises(SystemExit) as done:
        raise SystemExit(main([sub, "--help"]) if sub != "tokenizer" else main([sub]))
    assert done.value.code == 0


def _config_args(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(files, overrides) of a config command, None when the line is a placeholder."""
    files, overrides = [], []
    for word in argv[1:]:
        if word.startswith("[") or "CONFIG" in word or word.startswith("<"):
            return None  # a usage line, not a command
        if word.startswith("-") or word == "...":
            continue  # launcher / command flags, elided arguments
        if "=" in word:
            overrides.append(word)
        elif word.endswith(".yaml"):
            files.append(word)
    return files, overrides


@pytest.mark.parametrize(
    "where,argv",
    [(w, a) for w, a in COMMAND_LINES if a and a[0] in CONFIG_COMMANDS and _config_args(a)],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_config_commands_name_real_files_and_keys(where, argv, monkeypatch):
    parsed = _config_args(argv)  # usage lines with placeholders are left out above
    assert parsed is not None
    files, overrides = parsed
    monkeypatch.chdir(REPO)
    for f in files:
        if f.startswith("runs/"):  # a run folder's own config.yaml, written by an earlier line
            continue
        assert (REPO / f).is_file() or (REPO / "evoformer" / f).is_file(), f"{where}: no {f}"
    files = [f for f in files if not f.startswith("runs/")]
    load_config(
        [str(REPO / f) for f in files] or [str(REPO / "configs/quickstart.yaml")], overrides
    )
