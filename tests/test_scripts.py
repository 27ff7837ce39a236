"""The analysis scripts in scripts/: `python scripts/X.py --help` explains the script and every
argument. Read with ast only; importing a script pulls in TensorFlow, faiss or scikit-learn."""
from pathlib import Path

import pytest
from cli_help import help_problems

ROOT = Path(__file__).resolve().parents[1]


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
