import json
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
    assert "laser-batch score" in commands[0] and "pip install -e '.[train]' " in commands[0]
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


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    for name in ("docs/data.md", "docs/laser.md", "docs/export.md", "docs/scoring.md", "docs/scale-out.md",
                 "benchmarks/README.md"):
        assert name in links, f"README.md does not link {name}"
    for doc in [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]:
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):  # relative links, no URLs
            assert (doc.parent / link).exists(), f"{doc.relative_to(ROOT)} links {link}, which does not exist"


def test_readme_tour_has_one_command_per_step():
    readme = (ROOT / "README.md").read_text()
    tour = readme[readme.index("## A five-minute tour"):readme.index("## Headline results")]
    commands = re.findall(r"```bash\n\s*(laser-batch [^\n]+)\n\s*```", tour)
    assert [c.split()[1] for c in commands] == ["data", "train", "evaluate", "export", "score"]


def test_generated_tables_check_fails_when_a_result_changes(tmp_path):
    """--check covers both files: a results number that changes makes it fail until the tables are regenerated."""
    script = ROOT / "benchmarks" / "readme_table.py"
    for name in ("README.md", "benchmarks/README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    results = tmp_path / "benchmarks" / "results"
    results.mkdir()
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        (results / path.name).write_text(path.read_text())

    def check() -> int:
        return subprocess.run([sys.executable, str(script), "--check", "--root", str(tmp_path)],
                              capture_output=True).returncode

    assert check() == 0
    for changed, shown_in in (("sasrec_Beauty.json", "README.md"), ("score_ray.json", "benchmarks/README.md")):
        path = results / changed
        before = path.read_text()
        record = json.loads(before)
        if changed == "sasrec_Beauty.json":
            record["models"]["sasrec"]["HR@10"] = 0.5
        else:
            record["runs"][0]["users_per_s"] = 1.0
        path.write_text(json.dumps(record))
        assert check() == 1, f"--check did not see a change of {changed}"
        subprocess.run([sys.executable, str(script), "--root", str(tmp_path)], check=True)
        assert check() == 0
        assert (tmp_path / shown_in).read_text() != (ROOT / shown_in).read_text()
        path.write_text(before)
        subprocess.run([sys.executable, str(script), "--root", str(tmp_path)], check=True)
