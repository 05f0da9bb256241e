#!/usr/bin/env python3
"""Checks the layers of src/: each file imports only from its own layer or
the layers below it, and no two modules import each other in a circle.

Layers, lowest first (README "Layout"):
  1 problem   2 device   3 routines   4 entry   5 serving, sequence_parallel, burn
lib.rs re-exports from every layer and is not checked. A path `crate::X` that
names a re-export of lib.rs (`crate::DeviceTensor`) counts as an import of the
module the re-export comes from. Comments and doc comments are skipped: a doc
link may point anywhere. Exit 1 with one line per violation.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "src"
LAYERS = {"problem": 1, "device": 2, "routines": 3, "entry": 4,
          "serving": 5, "sequence_parallel": 5, "burn": 5}


def module_of(path):
    """The module path of a source file, as a tuple (`src/a/b.rs` -> (a, b))."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return tuple(parts)


def code(text):
    """The text without comments (line comments and doc comments)."""
    return "\n".join(re.sub(r"//.*", "", line) for line in text.splitlines())


def root_reexports(lib):
    """Names lib.rs re-exports at the crate root, to the module they come from."""
    names = {}
    for m in re.finditer(r"pub use (crate::|)([a-z_:]+)::\{?([^;]*?)\}?;", code(lib)):
        module = tuple(p for p in m.group(2).split("::") if p)
        for name in re.split(r"[\s,]+", m.group(3)):
            if name and name[0].isalpha():
                names[name] = module
    return names


def paths(text):
    """Every `crate::...` path in the code, braces expanded one level."""
    found = []
    for m in re.finditer(r"crate::([A-Za-z_][A-Za-z0-9_:]*)(::\{([^}]*)\})?", text):
        base = m.group(1).rstrip(":").split("::")
        if m.group(3) is None:
            found.append(base)
        else:
            for item in m.group(3).split(","):
                item = item.strip().split(" as ")[0]
                if item:
                    found.append(base + item.split("::"))
    return found


def resolve(path, reexports, modules):
    """The longest known module a path names (a root re-export resolved)."""
    if path[0] in reexports and len(path) == 1:
        return reexports[path[0]]
    if path[0] in reexports and tuple(path[:1]) not in modules:
        return reexports[path[0]]
    for cut in range(len(path), 0, -1):
        if tuple(path[:cut]) in modules:
            return tuple(path[:cut])
    return None


def main():
    files = {module_of(p): p for p in ROOT.rglob("*.rs")}
    modules = set(files)
    reexports = root_reexports((ROOT / "lib.rs").read_text())
    errors, graph = [], {}
    for module, path in sorted(files.items()):
        if module == ():
            continue
        layer = LAYERS.get(module[0])
        if layer is None:
            errors.append(f"{path}: top-level module `{module[0]}` has no layer")
            continue
        graph[module] = set()
        for crate_path in paths(code(path.read_text())):
            target = resolve(crate_path, reexports, modules)
            if target is None or target == ():
                continue
            target_layer = LAYERS.get(target[0], 0)
            if target_layer > layer:
                errors.append(
                    f"{path}: layer {layer} ({module[0]}) imports crate::{'::'.join(crate_path)}"
                    f" from layer {target_layer} ({target[0]})")
            # Imports of a module's own ancestors (its mod.rs) are not edges.
            if target != module and module[:len(target)] != target:
                graph[module].add(target)
    # Circles between modules (files), by depth-first search.
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt):] + [nxt]
                errors.append("circle: " + " -> ".join("::".join(m) for m in circle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    for error in errors:
        print(error)
    print(f"check-layers: {len(graph)} modules, {sum(map(len, graph.values()))} imports, "
          f"{len(errors)} violations")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
