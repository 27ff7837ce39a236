"""README.md tells users the truth about the commands and the facade, checked without running a
model: every ``ris-*`` command line in its shell blocks parses with that command's parser, every
``--flag`` it names belongs to a command (the one named beside it where it says which), and its
Python blocks compile and use only names that exist. (test_api.py runs the main Python example.)"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = ("extract", "train", "search", "eval", "index", "demo", "serve")
# flags the README names that belong to other programs: `ray start --head --port/--address`, pip, pytest,
# unshare, and the scripts it cites (their own tests check those: test_scripts.py, test_bench.py)
OTHER_PROGRAMS = {"--head", "--address", "--no-deps", "--collect-only", "--dist", "--mount-proc",
                  "--rule", "--ivfpq-params"}


def _parser(command: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"ris.cli.{command}").build_parser()


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings of a parser and its subcommands'."""
    found: set[str] = set()
    for action in parser._actions:
        found |= set(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _flags(sub)
    return found


def _command_lines(text: str) -> list[str]:
    """The ``ris-*`` invocations of the ```bash blocks: continuations joined, comments dropped,
    each part of ``a && b``, ``a; b``, ``a | b`` and ``(cd x && b)`` taken alone."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            code = "" if line.lstrip().startswith("#") else line.split(" #")[0]
            for part in re.split(r"&&|;|\|", code):
                part = part.strip().lstrip("(").rstrip(")").strip()
                if part.startswith("ris-"):
                    lines.append(part)
    return lines


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_readme_has_what_these_tests_read():
    assert len(_command_lines(README)) >= 25 and _python_blocks(README)


@pytest.mark.parametrize("line", _command_lines(README))
def test_every_readme_command_line_parses(line, capsys):
    argv = shlex.split(line)
    command = argv[0].removeprefix("ris-")
    assert command in COMMANDS, line
    try:
        _parser(command).parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"README: `{line}` is refused by ris-{command}'s parser (exit {exc.code}): "
                    f"{capsys.readouterr().err.strip().splitlines()[-1]}")


def test_every_flag_the_readme_names_belongs_to_a_command():
    """A flag renamed or removed in a parser but still in the README's option lists or prose."""
    known = set().union(*(_flags(_parser(c)) for c in COMMANDS)) | OTHER_PROGRAMS
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", README))
    assert not named - known, f"README names flags no ris-* command has: {sorted(named - known)}"


def test_a_flag_shown_beside_its_command_is_that_commands():
    """`ris-eval --min-ns`, `ris-train --folds`: where the README writes a command and a flag in one
    span of code, the flag must be that command's (another command's flag would not parse there)."""
    wrong = []
    for match in re.finditer(r"`ris-(\w+)([^`]*)`", README):
        command, rest = match.groups()
        if command not in COMMANDS:
            wrong.append(match.group(0))
            continue
        flags = _flags(_parser(command))
        wrong += [f"{match.group(0)}: {f}" for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)
                  if f not in flags]
    assert not wrong, wrong


def test_the_check_catches_a_flag_a_command_does_not_have():
    text = "```bash\nris-eval --features-db f.h5 --no-such-flag\n```\n"
    (line,) = _command_lines(text)
    with pytest.raises(SystemExit):
        _parser("eval").parse_args(shlex.split(line)[1:])


def _defines(module: str, name: str) -> bool:
    """Whether ``module`` (a ris module, read as source: importing some would load Keras) defines
    ``name`` at its top level, or it is a submodule of that package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    if spec.submodule_search_locations and importlib.util.find_spec(f"{module}.{name}"):
        return True
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


def _resolves(dotted: str) -> bool:
    """``ris.x.y.z``: the longest importable module prefix, then one name it defines (a class's
    attribute after it is not followed)."""
    import ris

    parts = dotted.split(".")
    if len(parts) == 2:
        return parts[1] in ris.__all__ or importlib.util.find_spec(dotted) is not None
    for cut in range(len(parts) - 1, 1, -1):
        module = ".".join(parts[:cut])
        if importlib.util.find_spec(module) is not None:
            return _defines(module, parts[cut])
    return False


@pytest.mark.parametrize("n", range(len(_python_blocks(README))))
def test_python_examples_compile_and_use_only_names_ris_has(n):
    import ris

    code = _python_blocks(README)[n]
    tree = ast.parse(compile(code, f"README.md python block {n + 1}", "exec", ast.PyCF_ONLY_AST))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ris":
            assert node.attr in ris.__all__, f"README uses ris.{node.attr}, which `import ris` does not export"
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "ris"):
            signature = inspect.signature(getattr(ris, node.func.attr))
            try:
                signature.bind(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
            except TypeError as exc:
                pytest.fail(f"README: ris.{node.func.attr}(...) at line {node.lineno} of block {n + 1}: {exc}")


def test_every_ris_name_the_prose_cites_exists():
    """`ris.images.decode_image`, `ris.forward.KEEP_RECENT`, `ris.RisError`, ...: a renamed function
    or constant leaves the README pointing at nothing."""
    cited = set(re.findall(r"`(ris(?:\.[A-Za-z_]\w*)+)", README)) - {"ris.json"}  # the file in a model's zip
    assert len(cited) >= 8
    missing = sorted(name for name in cited if not _resolves(name))
    assert not missing, f"README cites names ris does not have: {missing}"


def test_the_name_check_catches_a_missing_name():
    assert _resolves("ris.forward.KEEP_RECENT") and _resolves("ris.RisError")
    assert not _resolves("ris.forward.NO_SUCH_NAME") and not _resolves("ris.no_such_name")
