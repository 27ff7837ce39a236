"""Static check of the argparse help of the bench/ and scripts/ programs (tests/test_bench.py,
tests/test_scripts.py): every add_argument call has a non-empty help= that argparse's % expansion
accepts, every ArgumentParser a description, and no program reads sys.argv itself (where
``--help`` would be taken for a database path). Read with ``ast`` only, because importing the
scripts pulls in TensorFlow, faiss or Ray."""
import ast
from pathlib import Path


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


def _nonempty(value: ast.expr) -> bool:
    """A literal must be a non-empty string; any other expression (argparse.SUPPRESS, an f-string,
    a name) is taken as written on purpose."""
    if isinstance(value, ast.Constant):
        return isinstance(value.value, str) and bool(value.value.strip())
    return True


class _AnyKey(dict):
    def __missing__(self, key: str) -> int:
        return 0


def _formats(value: ast.expr) -> bool:
    """argparse expands a help string with ``%``: a lone % (``20% held out``) makes --help crash."""
    if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
        return True
    try:
        value.value % _AnyKey()
    except (ValueError, TypeError):
        return False
    return True


def _flag(call: ast.Call) -> str:
    names = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    dest = [k.value.value for k in call.keywords if k.arg == "dest" and isinstance(k.value, ast.Constant)]
    return "/".join(names or dest) or "?"


def _uses_doc(value: ast.expr) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "__doc__" for n in ast.walk(value))


def help_problems(path: Path, root: Path) -> list[str]:
    """One line per add_argument without help (or with a help --help cannot expand) and per
    ArgumentParser without a description: ``file:line: what``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    doc = ast.get_docstring(tree)
    rel = path.relative_to(root)
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        name = _name(node.func)
        if name == "add_argument" and not ("help" in kw and _nonempty(kw["help"])):
            problems.append(f"{rel}:{node.lineno}: {_flag(node)} has no help text")
        elif name == "add_argument" and not _formats(kw["help"]):
            problems.append(f"{rel}:{node.lineno}: {_flag(node)}'s help has a lone % (write %%)")
        elif name == "ArgumentParser":
            desc = kw.get("description", node.args[1] if len(node.args) > 1 else None)
            if desc is None or not _nonempty(desc) or (_uses_doc(desc) and not (doc and doc.strip())):
                problems.append(f"{rel}:{node.lineno}: ArgumentParser has no description")
    return problems


_TO_ARGPARSE = {"parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args"}


def argv_reads(path: Path, root: Path) -> list[str]:
    """One line per direct read of ``sys.argv`` (and per ``from sys import argv``): ``file:line: what``.
    Allowed: sys.argv passed to argparse (inside a ``parse_args(...)`` call) and sys.argv joined
    into text (``" ".join(sys.argv)``, ``shlex.join``: the command line recorded in a result), as
    neither decides what an argument means. Strings (a child's ``python -c`` code) are not code here."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(root)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "argv" for a in node.names):
            problems.append((node.lineno, node.col_offset,
                             f"{rel}:{node.lineno}: 'from sys import argv' reads the command line without argparse"))
        if not (isinstance(node, ast.Attribute) and node.attr == "argv"
                and isinstance(node.value, ast.Name) and node.value.id == "sys"):
            continue
        up, allowed = parents.get(node), False
        while up is not None and not allowed:
            allowed = isinstance(up, ast.Call) and _name(up.func) in _TO_ARGPARSE | {"join"}
            up = parents.get(up)
        if not allowed:
            problems.append((node.lineno, node.col_offset,
                             f"{rel}:{node.lineno}: reads sys.argv directly (use argparse, so --help works)"))
    return [line for *_, line in sorted(problems)]
