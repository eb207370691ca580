"""The package's shape: no import cycle between its files (function-level imports count), nothing outside
patchflow/train/ but the CLI imports the training package, no file over 450 lines, and no module outside
patchflow/kinds.py decides the kind of a run from model.arch. Imports are read with ast, nothing is imported."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "patchflow"
MAX_LINES = 450
CLI = {ROOT / "cli.py", ROOT / "__main__.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _imports(p: Path, modules: dict[str, Path]) -> set[Path]:
    """Files of patchflow that `p` imports anywhere (the deepest module each import names), except under
    `if TYPE_CHECKING`, and except a package's own __init__ seen from inside it."""
    tree = ast.parse(p.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    package = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            target = modules.get(name)
            if target and target != p and not (target.name == "__init__.py" and p.is_relative_to(target.parent)):
                found.add(target)
    return found


def _graph() -> dict[Path, set[Path]]:
    modules = _modules()
    return {p: _imports(p, modules) for p in modules.values()}


def _cycles(graph: dict[Path, set[Path]]) -> list[list[Path]]:
    """Strongly connected components of more than one file (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1; stack.append(start); on.add(start)  # noqa: E702
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)  # noqa: E702
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                part = []
                while True:
                    w = stack.pop(); on.discard(w); part.append(w)  # noqa: E702
                    if w == v:
                        break
                if len(part) > 1:
                    out.append(part)
    return out


def test_the_checker_finds_a_cycle():
    a, b, c = Path("a.py"), Path("b.py"), Path("c.py")
    assert [sorted(x) for x in _cycles({a: {b}, b: {a}, c: {a}})] == [[a, b]]
    assert _cycles({a: {b}, b: {c}, c: set()}) == []


def test_no_import_cycle():
    cycles = [" <-> ".join(str(p.relative_to(ROOT.parent)) for p in sorted(c)) for c in _cycles(_graph())]
    assert cycles == [], cycles


def test_only_the_cli_imports_the_training_package():
    train = ROOT / "train"
    offenders = sorted(str(p.relative_to(ROOT.parent)) for p, targets in _graph().items()
                       if not p.is_relative_to(train) and p not in CLI and any(t.is_relative_to(train) for t in targets))
    assert offenders == [], offenders


def test_no_file_over_the_line_limit():
    long = sorted((len(p.read_text().splitlines()), str(p.relative_to(ROOT.parent))) for p in ROOT.rglob("*.py"))
    assert [f for f in long if f[0] > MAX_LINES] == []


def test_the_kind_of_a_run_is_decided_in_kinds_only():
    """No module tests model.arch to tell class, text, video and codec runs apart; models check their own config's
    arch, converters check the one arch they convert."""
    pattern = re.compile(r"\.model\.arch\s*(==|!=|in\b|not in\b)")
    offenders = [f"{p.relative_to(ROOT.parent)}:{i}" for p in ROOT.rglob("*.py") if p.name != "kinds.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)
                 and not p.is_relative_to(ROOT / "convert")]
    assert offenders == [], offenders
