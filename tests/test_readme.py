"""The README's two set-up commands stay true: CI runs the test one, this test runs the demo."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set-up", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci.splitlines()


@pytest.mark.slow
def test_readme_demo_command_generates_text():
    demo = _setup_commands()[0]
    # Run it against the environment the tests run in, so it does not build a second venv.
    env = {**os.environ, "VENV": sys.prefix}
    result = subprocess.run(demo, shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    generated = [line for line in result.stdout.splitlines()
                 if line.strip() and not line.startswith(("make", "[tachylm]", sys.prefix))]
    assert generated, result.stdout
    assert "tokens/s" in result.stderr
