"""The package's import graph: no cycle (lazy imports inside functions count too), the arrows
between packages exactly as docs/architecture.md draws them, and every module importable first,
in an interpreter that has imported nothing of holiclip's."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"
# light top-level modules: io and _extras serve every package, the other two one user each
LIGHT = {"io": "*", "_extras": "*", "_compat": {"holiclip"}, "console": {"cli"}}
# the house plan's "never" arrows, checked even if the doc's table were edited to allow them
FORBIDDEN = [("models", "data"), ("models", "training"), ("models", "integrations"), ("models", "evaluation"),
             ("models", "loss"), ("loss", "models"), ("data", "models")]


def modules() -> dict[str, tuple[Path, bool]]:
    """``holiclip.x.y`` -> (file, is a package)."""
    found = {}
    for path in (SRC / "holiclip").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the holiclip modules it imports anywhere in its code (``from pkg import mod`` is an
    arrow to ``pkg.mod``; a name from a module is an arrow to that module)."""
    mods = modules()

    def owner(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, (path, package) in mods.items():
        here = name if package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    base = f"{up}.{base}" if base else up
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            targets |= {owner(n) for n in names if n.split(".")[0] == "holiclip"}
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "holiclip"


def package_arrows() -> dict[str, set[str]]:
    arrows: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        for target in targets:
            if package_of(target) != package_of(module):
                arrows.setdefault(package_of(module), set()).add(package_of(target))
    return arrows


def documented_arrows() -> dict[str, set[str] | None]:
    """The "Arrows" block of docs/architecture.md: ``A, B ───► X, Y (why)``; None for ``anything``."""
    block = DOC.read_text().split("## Arrows", 1)[1].split("```")[1]
    table: dict[str, set[str] | None] = {}
    for line in block.splitlines():
        if "►" not in line:
            continue
        left, right = re.split(r"\s*─*►\s*", line, maxsplit=1)
        right = re.sub(r"\([^)]*\)", "", right)
        targets = None if right.strip() == "anything" else {t.strip() for t in right.split(",") if t.strip()}
        for name in left.split(","):
            table[name.strip()] = targets
    return table


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "holiclip.models.sources" in graph["holiclip.models.registry"]  # the walk sees real imports
    assert "holiclip.io" in graph["holiclip.models.sources"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_arrows_between_packages_are_the_documented_ones():
    arrows, documented = package_arrows(), documented_arrows()
    assert {"cli", "models", "loss", "integrations"} <= set(documented)
    for package, targets in arrows.items():
        heavy = {t for t in targets if t not in LIGHT}
        for light in targets & set(LIGHT):
            users = LIGHT[light]
            assert users == "*" or package in users, f"{package} imports {light}, documented for {users} only"
        allowed = documented.get(package, set())
        if allowed is None:  # "anything"
            continue
        assert heavy == allowed, (f"{package} imports {sorted(heavy)}; docs/architecture.md says "
                                  f"{sorted(allowed)}: change the code or the doc")
    for package, allowed in documented.items():
        if allowed:  # an arrow the doc draws that the code no longer has
            assert allowed <= arrows.get(package, set()), f"{package}: {sorted(allowed - arrows.get(package, set()))}"
    for source, target in FORBIDDEN:
        assert target not in arrows.get(source, set()), f"{source} -> {target}"
    assert not [p for p, t in arrows.items() if "cli" in t and p != "cli"]
    assert not [p for p, t in arrows.items() if "benchmarks" in t and p not in ("cli", "benchmarks")]


# Imported once in the parent so that each child imports only holiclip's own code (the third-party
# packages are not what could form a cycle); holiclip itself is then dropped from sys.modules.
_PROBE = """
import importlib, json, os, sys, traceback
import holiclip  # the torchvision shim, before open_clip
for heavy in ("torch", "numpy", "PIL.Image", "open_clip", "safetensors.torch", "huggingface_hub", "yaml", "omegaconf",
              "typer", "rich", "tqdm", "webdataset", "faiss", "transformers", "httpx"):
    importlib.import_module(heavy)
for name in [m for m in sys.modules if m == "holiclip" or m.startswith("holiclip.")]:
    del sys.modules[name]
failures = {}
for module in json.loads(sys.argv[1]):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child: nothing of holiclip's imported yet
        os.close(read)
        try:
            importlib.import_module(module)
            message = ""
        except BaseException:
            message = traceback.format_exc()[-1500:]
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        message = fh.read().decode()
    os.waitpid(pid, 0)
    if message:
        failures[module] = message
print(json.dumps(failures))
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = sorted(m for m in modules() if not m.endswith("__main__"))
    assert len(names) > 50
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names)], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    failures = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"{m}:\n{msg}" for m, msg in failures.items())
