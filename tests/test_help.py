"""`mlx-edit COMMAND --help`: options in named groups (cloup), only the ones a command
uses, with its own defaults; the first screen of `inpaint --help` holds the essentials."""

import re

import pytest
from click.testing import CliRunner

from mlx_edit.cli import main
from mlx_edit.cli.help import GROUPS

EDITS = ("inpaint", "outpaint", "restyle", "edit")


def _help(*command: str) -> str:
    r = CliRunner().invoke(main, [*command, "--help"], terminal_width=80)
    assert r.exit_code == 0, r.output
    return r.output


def _sections(text: str) -> dict[str, list[str]]:
    """Section title -> the flags it lists (first flag of each entry)."""
    out, title = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            out[title] = []
        elif title and re.match(r"  (-\w, )?--", line):
            out[title].append(re.search(r"--[\w-]+", line).group())
    return out


@pytest.mark.parametrize("command", EDITS)
def test_every_option_is_in_a_named_group(command):
    sections = _sections(_help(command))
    titles = [t for t, _ in GROUPS] + ["Image and new area", "Other options"]
    assert set(sections) <= set(titles) and sections["Other options"] == ["--help"]
    for title in ("Prompt", "Output", "Model", "Quality", "Large canvases", "Performance"):
        assert sections[title], (command, title)
    assert all(len(line) <= 80 for line in _help(command).splitlines())


def _flat(text: str) -> str:
    """The help text unwrapped (click breaks lines after hyphens too)."""
    return " ".join(re.sub(r"-\n\s+", "-", text).split())


def test_each_command_shows_only_its_options_with_its_defaults():
    edit, inpaint, outpaint, restyle = (_flat(_help(c)) for c in ("edit", "inpaint",
                                                                  "outpaint", "restyle"))
    assert "--crop-to-mask" not in edit and "default: 50" not in edit
    assert "flux1-fill" not in edit and "flux1-kontext-dev" in edit
    assert re.search(r"--steps N .*\[default: \(28; klein 4\)\]", edit)
    assert re.search(r"--guidance F .*\[default: \(2.5; klein: unused\)\]", edit)
    assert re.search(r"--steps N .*\[default: \(50; klein 4\)\]", inpaint)
    assert "10 for" in restyle and "--controlnet" not in restyle
    for flag in ("--mask ", "--strength", "--rank", "--instruction"):
        assert flag not in outpaint, flag
    for flag in ("--left", "--true-cfg-scale", "--keep-size"):
        assert flag not in inpaint, flag


def test_inpaint_first_screen_shows_the_essentials():
    first = "\n".join(_help("inpaint").splitlines()[:40])
    for flag in ("--image", "--mask ", "--mask-point", "--prompt", "--output", "--seed",
                 "--model"):
        assert flag in first, flag


def test_top_level_help_lists_commands_by_section():
    sections = _help().split("Edit a photo:")[1]
    assert sections.index("inpaint") < sections.index("Many edits:") < \
        sections.index("batch") < sections.index("Models:") < sections.index("convert")
