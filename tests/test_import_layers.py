"""The package's import structure, read from the source (no imports run): layers point downwards, no
module imports another module's underscore names, and nothing imports in a circle at import time.

Layers, bottom first (design.md): plain-Python foundations and numerics, distributions, guides, models,
ArviZ output, runners and inference, analyses and datasets, figures, the CLI, the package's lazy root.
A function-level (lazy) import counts like a module-level one for the layer rule: no exceptions.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ppl_switch"

#: layer of each top-level module or subpackage (ppl_switch.<first part>); higher may import lower
LAYERS = {
    "version": 0, "errors": 0, "data": 0, "ops": 0, "compile_cache": 0,
    "distributions": 1,  # incl. distributions.switching_chain (the SLDS path), below the models that build it
    "guides": 2,
    "models": 3,
    "relabel": 4, "results": 4,
    "infer": 5,
    "analysis": 6, "datasets": 6,
    "plots": 7,  # plots.fit, plots.dynamics, plots.gpslds
    "cli": 8,
    "": 9,  # ppl_switch/__init__.py
}

def _module_name(path: pathlib.Path) -> str:
    parts = ("ppl_switch",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(name: str, source: str, modules: set[str], is_package: bool):
    """(imported module, names taken from it, at import time?) for each ppl_switch import in ``source``."""
    package = name if is_package else name.rsplit(".", 1)[0]
    tree = ast.parse(source)
    lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    for node in ast.walk(tree):
        eager = id(node) not in lazy
        if isinstance(node, ast.Import):
            yield from ((alias.name, [], eager) for alias in node.names if alias.name.startswith("ppl_switch"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if not base.startswith("ppl_switch"):
                continue
            for alias in node.names:  # `from package import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                yield (sub, [], eager) if sub in modules else (base, [alias.name], eager)


def import_graph(planted: dict[str, str] | None = None) -> dict:
    """{module: [(imported module, names, at import time?)]}; ``planted`` appends source to modules."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    planted = planted or {}
    return {name: list(_imports(name, path.read_text() + planted.get(name, ""), set(paths), path.name == "__init__.py"))
            for name, path in sorted(paths.items())}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[1] if "." in module else ""]


def private_imports(graph) -> list[str]:
    """Imports of another module's underscore names, or of a private module from outside its package."""
    found = []
    for importer, imports in graph.items():
        for target, names, _ in imports:
            private = any(p.startswith("_") and not p.startswith("__") for p in target.split("."))
            if private and target.rsplit(".", 1)[0] not in (importer, importer.rsplit(".", 1)[0]):
                found.append(f"{importer} imports the private module {target}")
            found += [f"{importer} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    return found


def private_attribute_uses(planted: dict[str, str] | None = None) -> list[str]:
    """``alias._name`` where ``alias`` is another ppl_switch module bound by an import in the same file
    (``from ppl_switch.ops import switching as sw`` then ``sw._helper``): the same breach as importing
    ``_helper``, which :func:`private_imports` cannot see."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    planted = planted or {}
    found = []
    for name, path in sorted(paths.items()):
        tree = ast.parse(path.read_text() + planted.get(name, ""))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in paths})
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ppl_switch"):
                aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in paths})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != name):
                found.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    return found


#: the underscore names of a NamedTuple's public API
NAMEDTUPLE_API = {"_replace", "_fields", "_asdict", "_make", "_field_defaults"}


def _own_attributes(cls: ast.ClassDef) -> set[str]:
    """Attributes a class defines for itself: ``self.<name> = ...`` in its methods and its ``__slots__``."""
    own = set()
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                own.add(t.attr)
            if isinstance(t, ast.Name) and t.id == "__slots__" and isinstance(node.value, (ast.Tuple, ast.List)):
                own.update(e.value for e in node.value.elts if isinstance(e, ast.Constant))
    return own


def private_member_uses(planted: dict[str, str] | None = None) -> list[str]:
    """``obj._name`` on an object other than ``self``/``cls`` (``model._helper()``, numpyro's
    ``guide._unpack_latent``): a reach into another object's internals. Allowed: a NamedTuple's
    ``_replace``/``_fields``, and a class reading its own attribute on another instance (``other._key`` in
    ``__eq__``)."""
    planted = planted or {}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        tree = ast.parse(path.read_text() + planted.get(name, ""))
        allowed_in = {}  # id(attribute node) -> the attributes its enclosing class defines
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            own = _own_attributes(cls)
            for node in ast.walk(cls):
                allowed_in[id(node)] = allowed_in.get(id(node), set()) | own
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id not in ("self", "cls")
                    and node.attr.startswith("_") and not node.attr.startswith("__") and node.attr not in NAMEDTUPLE_API
                    and node.attr not in allowed_in.get(id(node), ())):
                found.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def upward_imports(graph) -> set[tuple[str, str]]:
    return {(importer, target) for importer, imports in graph.items() for target, _, _ in imports
            if target != importer and _layer(target) > _layer(importer)}


def import_time_cycles(graph) -> list[list[str]]:
    """Cycles among the imports that run when a module is imported (function-level ones excluded)."""
    edges = {m: sorted({t for t, _, eager in imports if eager and t in graph and t != m}) for m, imports in graph.items()}
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for target in edges[module]:
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in edges:
        if module not in state:
            visit(module, [module])
    return cycles


GRAPH = import_graph()


def test_every_module_has_a_layer():
    missing = sorted({m for m in GRAPH if (m.split(".")[1] if "." in m else "") not in LAYERS})
    assert not missing, f"add these to LAYERS: {missing}"


def test_no_module_imports_another_modules_private_names():
    assert private_imports(GRAPH) == []


def test_no_module_uses_another_modules_private_names_through_the_module():
    assert private_attribute_uses() == []
    planted = private_attribute_uses({"ppl_switch.models.rslds": "\ndef f():\n    return sw._helper\n"})
    assert planted == ["ppl_switch.models.rslds uses ppl_switch.ops.switching._helper"]


def test_no_module_reaches_into_another_objects_private_members():
    assert private_member_uses() == []
    planted = private_member_uses({"ppl_switch.infer.path_gibbs": "\ndef f(model):\n    return model._drift()\n"})
    assert len(planted) == 1 and planted[0].startswith("ppl_switch.infer.path_gibbs:") and planted[0].endswith("uses model._drift")


def test_imports_point_down_the_layers():
    assert sorted(upward_imports(GRAPH)) == []


def test_no_import_cycles_at_import_time():
    assert import_time_cycles(GRAPH) == []


def test_each_rule_catches_a_planted_one_line_violation():
    private = import_graph({"ppl_switch.ops.hmm": "\nfrom ppl_switch.ops.scan import _private_helper\n"})
    assert private_imports(private) == ["ppl_switch.ops.hmm imports ppl_switch.ops.scan._private_helper"]
    lazy_upward = import_graph({"ppl_switch.ops.hmm": "\ndef f():\n    from ppl_switch.infer.fit import Fit\n"})
    assert upward_imports(lazy_upward) - upward_imports(GRAPH) == {("ppl_switch.ops.hmm", "ppl_switch.infer.fit")}
    circle = import_graph({"ppl_switch.ops.hmm": "\nimport ppl_switch.ops.sde\n", "ppl_switch.ops.sde": "\nimport ppl_switch.ops.hmm\n"})
    assert [set(cycle) for cycle in import_time_cycles(circle)] == [{"ppl_switch.ops.hmm", "ppl_switch.ops.sde"}]
    lazy_circle = import_graph({"ppl_switch.ops.hmm": "\nimport ppl_switch.ops.sde\n", "ppl_switch.ops.sde": "\ndef f():\n    import ppl_switch.ops.hmm\n"})
    assert import_time_cycles(lazy_circle) == []  # a function-level import does not run at import time
