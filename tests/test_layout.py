"""The package layering of common/ (read from the source with ast, nothing imported): no import circle, and no
module importing from a package above its own. Also: README and docs/ links resolve."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = os.path.join(ROOT, "common")
# Pipeline order, bottom first; modules directly in common/ are command-line entry points above everything.
LAYERS = ("core", "diffusion", "quant", "importance", "evaluation", "experiments")
ENTRY = len(LAYERS)


def modules(folder=COMMON, package="common") -> dict:
    """{dotted module name: path} of every .py file under ``folder`` (packages by their ``__init__``)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        pkg = package if rel == "." else package + "." + rel.replace(os.sep, ".")
        for f in files:
            if f.endswith(".py"):
                out[pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"] = os.path.join(dirpath, f)
    return out


def imports_of(name: str, path: str, known: dict) -> set:
    """The project modules ``name`` imports, lazy (inside functions) ones included."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - (node.level - 1)]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import mod` imports a module; `from mod import name` the module holding name
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph(folder=COMMON, package="common") -> dict:
    known = modules(folder, package)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def rank(module: str) -> int:
    """Layer index of a module; the ``common`` package itself is a namespace (rank -1, imports nothing)."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else ENTRY


def upward_imports(g: dict) -> list:
    """(importer, imported) pairs where the imported module's package lies above the importer's; nothing may
    import an entry point."""
    return sorted((a, b) for a, deps in g.items() for b in deps
                  if rank(b) > rank(a) or (rank(b) == ENTRY and a != b))


def find_cycle(g: dict):
    """One import circle as a list of modules [m0, m1, ..., m0], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(g):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_every_module_is_in_a_layer():
    g = graph()
    stray = [m for m in g if m.count(".") >= 2 and m.split(".")[1] not in LAYERS]
    assert not stray, f"modules in a package that is not a layer {LAYERS}: {stray}"
    for layer in LAYERS:
        assert os.path.isfile(os.path.join(COMMON, layer, "__init__.py")), layer
    # the parser sees the real imports (a check over an empty graph would pass vacuously)
    assert "common.core.storage" in g["common.experiments.pipeline"]
    assert "common.quant.formats" in g["common.importance.weights"]


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_upward_import():
    bad = upward_imports(graph())
    assert not bad, "\n".join(f"{a} (layer {a.split('.')[1]}) imports {b}, which lies above it" for a, b in bad)


def test_core_imports_nothing_of_ours_outside_core():
    g = graph()
    bad = [(a, b) for a, deps in g.items() if a.startswith("common.core") for b in deps
           if not b.startswith("common.core")]
    assert not bad, bad


def _write(tmp_path, files: dict):
    for rel, text in files.items():
        p = tmp_path / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return graph(str(tmp_path / "pkg"), "pkg")


def test_checks_catch_a_planted_circle(tmp_path):
    """The check itself can fail: a circle between two modules of one package is named, lazy imports included."""
    g = _write(tmp_path, {
        "__init__.py": "", "core/__init__.py": "", "quant/__init__.py": "",
        "core/a.py": "X = 1\n",
        "quant/b.py": "from ..core.a import X\nfrom . import d\n",
        "quant/d.py": "def f():\n    from .b import X\n",
    })
    assert g["pkg.quant.b"] == {"pkg.core.a", "pkg.quant.d"}
    assert find_cycle(g) == ["pkg.quant.b", "pkg.quant.d", "pkg.quant.b"]
    assert upward_imports(g) == []


def test_checks_catch_a_planted_upward_import(tmp_path):
    g = _write(tmp_path, {
        "__init__.py": "", "core/__init__.py": "", "experiments/__init__.py": "", "entry.py": "",
        "core/a.py": "def f():\n    from ..experiments.c import g\n",
        "experiments/c.py": "import pkg.entry\n\ndef g():\n    pass\n",
    })
    assert find_cycle(g) is None
    assert upward_imports(g) == [("pkg.core.a", "pkg.experiments.c"), ("pkg.experiments.c", "pkg.entry")]


# ----------------------------------------------------------------------------- documentation
MD_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
DOCS = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]|<[^>]+>", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set:
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    seen, out = {}, set()
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def links(path: str) -> list:
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    return [a or b for a, b in MD_LINK.findall(text)]


@pytest.mark.parametrize("doc", DOCS, ids=[os.path.relpath(d, ROOT) for d in DOCS])
def test_relative_links_resolve(doc):
    broken = []
    for target in links(doc):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(doc), file)) if file else doc
        if not os.path.exists(dest):
            broken.append(f"{target} (no file {os.path.relpath(dest, ROOT)})")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {os.path.relpath(dest, ROOT)})")
    assert not broken, f"{os.path.relpath(doc, ROOT)}: " + "; ".join(broken)


def test_readme_is_a_front_door_and_generated_blocks_exist_once():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 15 * 1024
    text = {d: open(d).read() for d in DOCS}
    for marker in ("results", "compare", "actquant", "perf", "learning-curve", "sensitivity", "lowbit", "finetune"):
        holders = [d for d, t in text.items() if f"<!-- {marker}:start -->" in t and f"<!-- {marker}:end -->" in t]
        assert len(holders) == 1, (marker, holders)


def test_scripts_start_without_the_heavy_optional_imports():
    """torchvision / pytorch-fid / torch-fidelity (which pull in torch._dynamo) and scipy.stats cost a script
    ~2-3 s of start-up; they are imported where Inception, KID or a test statistic is first needed."""
    code = ("import sys\nimport common.experiments.pipeline, common.experiments.lowbit, common.experiments.finetune\n"
            "print(sorted(m for m in ('torchvision', 'pytorch_fid', 'torch_fidelity', 'scipy.stats') "
            "if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
