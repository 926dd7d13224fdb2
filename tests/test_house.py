"""The shape of the code (issue 32): no import cycle inside medcl, and no new long function.

Imports are read from the source (every `from .x import y`, at module level or inside a function, where most of
medcl's internal imports sit so that cheap commands never load torch), so a cycle hidden behind a lazy import is
still a cycle here."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "medcl"
MAX_LINES = 80
# functions still over MAX_LINES, with their length today: they may shrink, not grow, and no other may join them
# (evaluate's protocol loop, the cache builder and the selection are the next to split: issue 32)
LONG = {"evaluate.evaluate": 94, "data.cache.build_cache": 117, "select.select_scans": 103}


def _modules() -> dict:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _imports(name: str, path: Path, mods: dict) -> set:
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(p for p in pkg[:len(pkg) - node.level + 1] + [node.module or ""] if p)
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                deps.add(sub if sub in mods else base)
    return {d for d in deps if d in mods and d != name}


def test_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_no_new_long_function():
    found = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    found[f"{name}.{node.name}".lstrip(".")] = n
    grew = {k: (n, LONG[k]) for k, n in found.items() if k in LONG and n > LONG[k]}
    new = {k: n for k, n in found.items() if k not in LONG}
    assert not grew and not new, f"longer than {MAX_LINES} lines: new {new}; grew (now, allowed) {grew}"


def test_the_data_settings_are_read_in_one_place():
    """Every command reads an encoder's preprocessing through medcl.data.preprocessing.Preprocessing, not by
    re-reading the saved dict with its own fallbacks (which once differed between commands)."""
    import re

    from medcl.config import DataConfig
    from medcl.data.preprocessing import Preprocessing

    pattern = re.compile(r"""\.get\(["'](dims|size|channels|intensity|skip_label_maps)["']""")
    # (commands/common.py reads the user's own flags and commands/cache.py the cache's index, not an encoder's)
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in ROOT.rglob("*.py")
                 if p.relative_to(ROOT).as_posix() not in ("data/preprocessing.py", "commands/common.py",
                                                           "commands/cache.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
    saved = {"dims": 3, "size": 32, "channels": 1, "intensity": "minmax"}  # an older file: no skip_label_maps
    p = Preprocessing.of(saved)
    assert (p.dims, p.size, p.intensity, p.skip_label_maps, p.input_shape) == (3, 32, "minmax", True, (1, 32, 32, 32))
    assert Preprocessing.of(p.to_dict()) == p == Preprocessing.of(p)
    cfg = DataConfig()
    assert Preprocessing.of(cfg) == Preprocessing(cfg.dims, cfg.size, cfg.channels, cfg.intensity, cfg.skip_label_maps)
