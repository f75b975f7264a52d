"""The architecture's rules, checked on the source: no import circles (function-level imports included),
every run-folder file name spelled in exactly one module, nothing cites files outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "hypersort_ray"

# The run folder's names (docs/architecture.md): only hypersort_ray/runs/layout.py may spell them.
RUN_FOLDER_NAMES = (
    "latents.csv", "history.csv", "sample_losses.csv", "train_summary.json", "styles.json", "suspicion.csv",
    "metrics.json", "report.html", "provenance.json", "baselines.csv", "baselines.json", "latent_map.png",
    "latent_map.html", "loss_curves.png", "ray_results",
)


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every hypersort_ray module ``path`` imports, anywhere in the file (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        # A package's __init__ importing its own submodules is not a circle of the layering.
        graph[name] = {m for m in _imports(path, modules) if m != name and not m.startswith(name + ".")}
    assert _cycles(graph) == []


def test_run_folder_names_live_in_one_module():
    spelled = {}
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        if path == Path(__file__):
            continue
        text = path.read_text()
        for name in RUN_FOLDER_NAMES:
            if re.search(rf"[\"']{re.escape(name)}[\"']", text):
                spelled.setdefault(name, []).append(str(path.relative_to(ROOT)))
    outside = {n: [f for f in files if f != "hypersort_ray/runs/layout.py"] for n, files in spelled.items()}
    assert {n: f for n, f in outside.items() if f} == {}


def test_nothing_cites_files_outside_the_repository():
    # The briefs the project was started from live outside the repository; spelled in pieces so that this
    # test does not cite them itself.
    briefs = "|".join(["CLI", "DESIGN", "STACK" + "_NOTES", "paper", "hooks", "tools"])
    pattern = re.compile(rf"\.\./shared|shared/({briefs})|STACK{'_'}NOTES")
    hits = []
    for path in [*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"), *PACKAGE.rglob("*.py"),
                 *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"),
                 *(ROOT / "deployments").rglob("*"), *(PACKAGE / "configs").glob("*.yaml")]:
        if path.is_file() and path != Path(__file__) and pattern.search(path.read_text(errors="ignore")):
            hits.append(str(path.relative_to(ROOT)))
    assert hits == []


def test_docs_links_resolve():
    """Every relative link in README.md and docs/ points at a file of the repository."""
    broken = []
    for md in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)", md.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_test_module_names_are_unique():
    """tests/ has no __init__.py files (pytest's rootdir import mode): two test modules with the same
    file name in different folders stop the whole collection with 'import file mismatch'."""
    seen: dict[str, list[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
