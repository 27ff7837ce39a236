"""The analysis scripts in scripts/: `python scripts/X.py --help` explains the script and every
argument, and every documented invocation still parses. Read with ast only, except for the scripts
in ARGPARSED, whose heavy imports wait until after their arguments are parsed."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cli_help import argv_reads, help_problems

ROOT = Path(__file__).resolve().parents[1]
# Read sys.argv themselves until 2026-12-03 (`--help` was taken as the database path); the docs that
# show how each is called.
ARGPARSED = ["kill_resume_check", "query_cost", "rotation_check", "rotation_cost", "verify_sidecar"]
DOCS = ["README.md", "bench/README.md", "bench/quality.md", "scripts/quality_findings.md"]


@pytest.mark.parametrize("path", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_every_script_argument_has_help_text(path):
    problems = help_problems(path, ROOT)
    assert not problems, "\n".join(problems)


def test_the_help_check_names_a_missing_help_and_description(tmp_path):
    """The check itself fails where it should: a flag and a positional without help, an empty help,
    a parser without a description, description=__doc__ in a module without a docstring, and a
    help with a lone % (argparse's --help would raise ValueError)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import argparse\n"
                   "p = argparse.ArgumentParser()\n"
                   "p.add_argument('db')\n"
                   "p.add_argument('--n', type=int, default=3, help='')\n"
                   "p.add_argument('--ok', help='fine')\n"
                   "q = argparse.ArgumentParser(description=__doc__)\n"
                   "q.add_argument('--f', default=0.2, help='share held out, 20% (default: %(default)s)')\n"
                   "q.add_argument('--g', default=0.2, help='share held out, 20%% (default: %(default)s)')\n")
    assert help_problems(bad, tmp_path) == [
        "bad.py:2: ArgumentParser has no description",
        "bad.py:3: db has no help text",
        "bad.py:4: --n has no help text",
        "bad.py:6: ArgumentParser has no description",
        "bad.py:7: --f's help has a lone % (write %%)",
    ]


@pytest.mark.parametrize("path", sorted([*(ROOT / "scripts").glob("*.py"), *(ROOT / "bench").glob("*.py")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_script_reads_sys_argv_itself(path):
    """A script that indexes sys.argv takes `--help` for its first argument (a database path, a count)."""
    problems = argv_reads(path, ROOT)
    assert not problems, "\n".join(problems)


def test_the_argv_check_names_each_direct_read(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import argparse, shlex, sys\n"
                   "db = sys.argv[1]\n"
                   "n = int(sys.argv[2]) if len(sys.argv) > 2 else 3\n"
                   "args = argparse.ArgumentParser(description='x').parse_args(sys.argv[1:])\n"
                   "cmd = ' '.join([sys.executable, *sys.argv]) + shlex.join(sys.argv)\n"
                   "child = 'import sys; print(sys.argv[1])'\n"
                   "from sys import argv\n")
    assert argv_reads(bad, tmp_path) == [
        "bad.py:2: reads sys.argv directly (use argparse, so --help works)",
        "bad.py:3: reads sys.argv directly (use argparse, so --help works)",
        "bad.py:3: reads sys.argv directly (use argparse, so --help works)",
        "bad.py:7: 'from sys import argv' reads the command line without argparse",
    ]


@pytest.mark.parametrize("name", ARGPARSED)
def test_script_help_exits_0_with_usage(name):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), "--help"], check=False,
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    missing = re.search(r"ModuleNotFoundError: No module named '([^']+)'", done.stderr)
    if done.returncode != 0 and missing:
        pytest.skip(f"scripts/{name}.py needs {missing.group(1)}, not installed here")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout, done.stdout


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no work at import: main() runs under __main__ only
    return module


def _documented(name: str) -> list[list[str]]:
    """Every `python scripts/NAME.py ARGS` written in the docs, as argv lists (a # comment ends it)."""
    found = []
    for doc in DOCS:
        for m in re.finditer(rf"python scripts/{name}\.py([^`\n#]*)", (ROOT / doc).read_text()):
            found.append(shlex.split(m.group(1)))
    return found


@pytest.mark.parametrize("name", ARGPARSED)
def test_every_documented_invocation_still_parses(name):
    calls = _documented(name)
    assert calls, f"no `python scripts/{name}.py ...` found in {DOCS}"
    module = _script(name)
    for argv in calls:
        module.parse_args(argv)  # argparse exits with status 2 on an argv it refuses


def test_the_converted_scripts_keep_their_positional_order_and_defaults():
    k = _script("kill_resume_check")
    assert vars(k.parse_args(["20", "60000"])) == {"cycles": 20, "rows": 60000}
    assert k.parse_args(["3"]).rows == 4000
    q = _script("query_cost")
    assert vars(q.parse_args(["uk.h5"])) == {"db": "uk.h5", "methods": ["none", "dba+qe"]}
    assert q.parse_args(["uk.h5", "dba"]).methods == ["dba"]
    r = _script("rotation_check")
    assert vars(r.parse_args(["uk.h5", "data", "rot/", "50", "5"])) == {
        "db": "uk.h5", "dataset": "data", "workdir": "rot/", "queries": 50, "verify_k": 5}
    defaults = r.parse_args(["uk.h5", "data", "rot/"])
    assert (defaults.queries, defaults.verify_k) == (100, 10)
    c = _script("rotation_cost")
    assert vars(c.parse_args(["uk.h5"])) == {"db": "uk.h5", "queries": 30, "rerank": "none"}
    assert vars(c.parse_args(["uk.h5", "30", "dba+qe"])) == {"db": "uk.h5", "queries": 30, "rerank": "dba+qe"}
    v = _script("verify_sidecar")
    assert vars(v.parse_args(["uk.h5"])) == {"db": "uk.h5", "features": 500, "side": 512}
    assert vars(v.parse_args(["uk.h5", "300", "384"])) == {"db": "uk.h5", "features": 300, "side": 384}


def test_corel_queries_help_explains_it_instead_of_printing_the_list():
    """README cites scripts/corel_queries.py for its 200 Corel queries; it had no parser, so
    `--help` printed the 200 file names. The list itself is unchanged (the README's scores use it)."""
    script = str(ROOT / "scripts" / "corel_queries.py")
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: corel_queries.py"), done.stdout[:200]
    assert "ris-eval --queries" in done.stdout
    names = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60,
                           check=True).stdout.split()
    assert len(names) == len(set(names)) == 200 and (names[0], names[1], names[-1]) == ("1.jpg", "3.jpg", "992.jpg")
    assert all(sum(int(n[:-4]) // 100 == c for n in names) == 20 for c in range(10))
