#!/usr/bin/env python3
"""Finds import cycles between the modules of a Rust crate, from its `use` lines.

Usage: scripts/module-cycles.py [--depth N] SRC_DIR [MODULE_PREFIX ...]

SRC_DIR is a crate's src/ (vmm/src, guest-image/src). Every .rs file is a module
(`smmu/fault_engine.rs` is `smmu::fault_engine`, `smmu/mod.rs` is `smmu`); its edges are
the modules named by its `use crate::...`, `use super::...` and `use self::...` lines (and
`crate::a::b` paths elsewhere in the code), resolved to the longest module that exists.
A parent using its own child (`mod.rs` re-exporting) is not an edge, nor is a child
using its parent: Rust modules nest, and only siblings (or cousins) can form a cycle
that a split would break. With `--depth N` every module is taken as its first N path
components (`--depth 1`: the layers, `smmu`, `devices`, ...). Test modules (`tests`, `*_tests`) are skipped.

Prints every strongly connected component of more than one module (a cycle) among the
modules whose path starts with one of MODULE_PREFIXes (all modules when none is given)
and exits 1 if there is one, 0 otherwise. Uses only the standard library, so CI can run
it with any python3.
"""

import os
import re
import sys


def module_of(src, path):
    rel = os.path.relpath(path, src)[: -len(".rs")]
    parts = rel.split(os.sep)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return "::".join(parts)


def is_test(module):
    return any(p == "tests" or p.endswith("_tests") or p == "test_driver" for p in module.split("::"))


USE = re.compile(r"\buse\s+((?:crate|super|self)(?:::\w+)*)(?:::\{([^;]*)\})?", re.S)
PATH = re.compile(r"(?<![\w:])((?:crate|super)(?:::\w+)+)")


def resolve(module, path, modules):
    """The module a `crate::`/`super::`/`self::` path names (longest existing prefix)."""
    parts = path.split("::")
    base = module.split("::") if module else []
    if parts[0] == "crate":
        base, parts = [], parts[1:]
    else:
        while parts and parts[0] in ("super", "self"):
            if parts[0] == "super":
                base = base[:-1]
            parts = parts[1:]
    full = base + parts
    for n in range(len(full), -1, -1):
        name = "::".join(full[:n])
        if name in modules:
            return name
    return None


def edges_of(src):
    files = {}
    for root, _, names in os.walk(src):
        for name in names:
            if name.endswith(".rs"):
                path = os.path.join(root, name)
                files[module_of(src, path)] = path
    modules = {m for m in files if not is_test(m)}
    edges = {m: set() for m in modules}
    for module in modules:
        text = open(files[module], encoding="utf-8").read()
        # Drop `#[cfg(test)] mod tests { ... }` bodies: only the non-test code counts.
        text = re.split(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)[0]
        text = re.sub(r"//[^\n]*", "", text)
        paths = []
        for m in USE.finditer(text):
            head, group = m.group(1), m.group(2)
            if group:
                for item in re.split(r",(?![^{]*\})", group):
                    item = item.strip().split(" as ")[0].strip()
                    first = re.match(r"\w+", item)
                    if first and first.group(0) != "self":
                        paths.append(head + "::" + first.group(0))
                    else:
                        paths.append(head)
            else:
                paths.append(head)
        paths += PATH.findall(text)
        for p in paths:
            target = resolve(module, p, modules)
            if target is None or target == module:
                continue
            # Nesting is not a dependency between siblings.
            if target.startswith(module + "::") or module.startswith(target + "::") or (target == "" or module == ""):
                continue
            edges[module].add(target)
    return edges


def cycles(edges):
    """Tarjan's strongly connected components with more than one member."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    if len(sys.argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    args = sys.argv[1:]
    depth = None
    if args[:1] == ["--depth"]:
        depth, args = int(args[1]), args[2:]
    src, prefixes = args[0], args[1:]
    edges = edges_of(src)
    if depth is not None:
        cut = lambda m: "::".join(m.split("::")[:depth])
        merged = {}
        for m, ts in edges.items():
            merged.setdefault(cut(m), set()).update(cut(t) for t in ts if cut(t) != cut(m))
        edges = merged
    if prefixes:
        keep = {m for m in edges if any(m == p or m.startswith(p + "::") for p in prefixes)}
        edges = {m: {t for t in ts if t in keep} for m, ts in edges.items() if m in keep}
    found = cycles(edges)
    for comp in found:
        members = set(comp)
        print("cycle: " + ", ".join(comp))
        for m in comp:
            for t in sorted(edges[m] & members):
                print(f"    {m} -> {t}")
    scope = ", ".join(prefixes) if prefixes else "the whole crate"
    print(f"{len(edges)} modules in {scope}, {len(found)} cycle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
