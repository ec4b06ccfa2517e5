import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3 -m venv[^\n]+)\n```", (ROOT / "README.md").read_text())


def _ci_commands() -> list[str]:
    """The lines of .ci/run that run a README command: `( COMMAND )`, each in its own subshell."""
    return re.findall(r"^\( (python3 -m venv.+) \)$", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)


def test_readme_starts_with_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    commands = _readme_commands()
    assert len(commands) == 2
    assert "laser-batch score" in commands[0] and "pip install -e . " in commands[0]
    assert "pytest" in commands[1] and "[dev]" in commands[1]
    before = readme[:readme.index(commands[0])]
    assert before.count("```") == 1, "the first code block of the README must be the first set-up command"


def test_ci_runs_both_readme_commands_verbatim_each_in_a_fresh_venv():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _ci_commands() == _readme_commands()
    # a fresh venv for each: .venv is removed before the first and between the two
    first, second = (ci.index(c) for c in _readme_commands())
    assert "rm -rf .venv" in ci[:first] and "rm -rf .venv" in ci[first:second]


def test_readme_benchmark_table_is_generated_from_the_results():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_table.py"), "--check"])
    assert done.returncode == 0, "README table is stale: run python benchmarks/readme_table.py"
