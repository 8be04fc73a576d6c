#!/usr/bin/env python3
"""Checks that the host's modules import each other one way only.

Reads every `.rs` file under `host/src` (tests excluded: a `#[cfg(test)]` block may reach
anywhere), follows each `crate::`, `super::` and `self::` path to the file that defines
the item (through `pub use` re-exports, so a re-export in a parent does not count as a
dependency on the parent), and looks for circles at two levels:

- files: `pipeline/shadow.rs` -> `pipeline/stats.rs` -> `pipeline/shadow.rs`;
- top-level folders: `http` -> `pipeline` -> `http`.

and, with `--readme README.md`, that the README's architecture map lists every part of
`host/src` in an order the imports respect: each part uses only parts listed above it.

Prints each circle (or out-of-order import) with the import line that makes it and exits
1 if there is any; with `--graph`, prints the folder-level graph.

    python3 tests/architecture/imports.py [host/src] [--graph] [--readme README.md]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

USE_RE = re.compile(r"\b(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.S)
PATH_RE = re.compile(r"\b((?:crate|super|self)(?:::(?:\w+|\{))+)")
MOD_DECL_RE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", re.M)


def strip_noise(text: str) -> str:
    """Drops comments, string literals and `#[cfg(test)]` items."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    out = []
    i = 0
    while True:
        j = text.find("#[cfg(test)]", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        # Skip the item: to the end of its first balanced `{…}` or to a `;`.
        k = j + len("#[cfg(test)]")
        depth = 0
        while k < len(text):
            c = text[k]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    k += 1
                    break
            elif c == ";" and depth == 0:
                k += 1
                break
            k += 1
        i = k
    return "".join(out)


def inline_modules(mod: tuple[str, ...], text: str) -> list[tuple[tuple[str, ...], str]]:
    """The file's text outside inline `mod x { … }` blocks, under `mod`, and each block's
    body under `mod::x`: `super::` inside a block names the file's own module."""
    parts = []
    rest, i = [], 0
    for m in re.finditer(r"\bmod\s+(\w+)\s*\{", text):
        if m.start() < i:
            continue
        depth, k = 0, m.end() - 1
        while k < len(text):
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            if depth == 0:
                break
            k += 1
        rest.append(text[i : m.start()])
        parts += inline_modules(mod + (m.group(1),), text[m.end() : k])
        i = k + 1
    rest.append(text[i:])
    return [(mod, "".join(rest))] + parts


def expand_use(tree: str) -> list[tuple[str, str]]:
    """`a::{b, c::{d as e}}` -> [("a::b", "b"), ("a::c::d", "e")]."""
    tree = re.sub(r"\s+", "", tree)

    def split_top(s: str) -> list[str]:
        parts, depth, cur = [], 0, ""
        for c in s:
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            if c == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += c
        if cur:
            parts.append(cur)
        return parts

    def walk(prefix: str, s: str) -> list[tuple[str, str]]:
        brace = s.find("{")
        if brace >= 0 and s.endswith("}"):
            head = s[:brace].rstrip(":")
            base = f"{prefix}::{head}" if prefix and head else prefix or head
            out = []
            for part in split_top(s[brace + 1 : -1]):
                out += walk(base, part)
            return out
        full = f"{prefix}::{s}" if prefix else s
        if full.endswith("::self"):
            full = full[: -len("::self")]
        name = full.split("::")[-1]
        return [(full, name)]

    return walk("", tree)


class Crate:
    def __init__(self, root: Path):
        self.root = root
        self.files: dict[tuple[str, ...], Path] = {}
        self.text: dict[tuple[str, ...], str] = {}
        self._discover(("crate",), root / "lib.rs")
        self.reexports: dict[tuple[str, ...], dict[str, tuple[str, ...]]] = {}
        for mod, text in self.text.items():
            self.reexports[mod] = {}
            for m in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", text, re.S):
                for full, name in self._expand(m.group(1)):
                    self.reexports[mod][name] = self.absolute(mod, full.split("::"))

    def _discover(self, mod: tuple[str, ...], path: Path) -> None:
        self.files[mod] = path
        self.text[mod] = strip_noise(path.read_text())
        here = path.parent if path.name in ("lib.rs", "mod.rs") else path.with_suffix("")
        for name in MOD_DECL_RE.findall(self.text[mod]):
            for child in (here / f"{name}.rs", here / name / "mod.rs"):
                if child.exists():
                    self._discover(mod + (name,), child)
                    break

    @staticmethod
    def _expand(tree: str) -> list[tuple[str, str]]:
        # `as` renames survive whitespace removal only if we split on them first.
        tree = re.sub(r"\s+as\s+(\w+)", r"@\1", tree)
        out = []
        for full, _ in expand_use(tree):
            if "@" in full:
                path, alias = full.split("@", 1)
                out.append((path, alias))
            else:
                out.append((full, full.split("::")[-1]))
        return out

    def absolute(self, mod: tuple[str, ...], segs: list[str]) -> tuple[str, ...]:
        path = list(mod)
        if segs[0] == "crate":
            path, segs = ["crate"], segs[1:]
        elif segs[0] in ("super", "self"):
            while segs and segs[0] in ("super", "self"):
                if segs[0] == "super":
                    path = path[:-1]
                segs = segs[1:]
        elif mod + (segs[0],) in self.files:
            pass  # a child module, named without `self::`
        else:
            return tuple(["extern"] + segs)
        return tuple(path + segs)

    def resolve(self, path: tuple[str, ...], seen: int = 0) -> tuple[str, ...] | None:
        """The module (file) that defines what `path` names."""
        if not path or path[0] != "crate" or seen > 16:
            return None
        i = len(path)
        while i > 0 and path[:i] not in self.files:
            i -= 1
        mod = path[:i]
        if i < len(path):
            exported = self.reexports.get(mod, {}).get(path[i])
            if exported is not None and exported != path[: i + 1]:
                return self.resolve(exported + path[i + 1 :], seen + 1) or mod
        return mod

    def _paths(self, mod: tuple[str, ...], text: str) -> list[str]:
        """Every path in `text` that may name something of this crate."""
        paths: list[str] = []
        for m in USE_RE.finditer(text):
            paths += [p for p, _ in self._expand(m.group(1))]
        body = USE_RE.sub("", text)
        paths += [p.rstrip(":{") for p in PATH_RE.findall(body)]
        children = [m[-1] for m in self.files if m[:-1] == mod]
        if children:
            child_re = re.compile(rf"(?<![\w:])((?:{'|'.join(children)})(?:::\w+)+)")
            paths += child_re.findall(body)
        return paths

    def edges(self) -> dict[tuple[str, ...], dict[tuple[str, ...], str]]:
        """module -> {module it depends on: the first import line that says so}."""
        graph: dict[tuple[str, ...], dict[tuple[str, ...], str]] = {}
        for mod, text in self.text.items():
            deps: dict[tuple[str, ...], str] = {}
            for scope, part in inline_modules(mod, text):
                for p in self._paths(scope, part):
                    target = self.resolve(self.absolute(scope, p.split("::")))
                    if target is None or target == mod:
                        continue
                    deps.setdefault(target, p)
            graph[mod] = deps
        return graph


def cycles(graph: dict) -> list[list]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
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
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def name(mod: tuple[str, ...]) -> str:
    return "::".join(mod[1:]) or "crate"


def check_map(readme: Path, folders: dict[str, dict[str, str]]) -> int:
    """Problems with the README's map: parts missing, or importing parts listed below them."""
    text = readme.read_text()
    start = text.find("## Architecture")
    block = text[start : text.find("```", text.find("```", start) + 3)] if start >= 0 else ""
    order = re.findall(r"^\s+src/(\w+)(?:/|\.rs)", block, re.M)
    problems = 0
    for part in sorted(set(folders) - {"crate"} - set(order)):
        problems += 1
        print(f"{readme}: the architecture map does not list src/{part}")
    position = {part: i for i, part in enumerate(order)}
    for part, deps in sorted(folders.items()):
        for dep, line in sorted(deps.items()):
            if part in position and dep in position and position[dep] > position[part]:
                problems += 1
                print(f"{readme}: src/{part} is listed above src/{dep}, but imports it   ({line})")
    return problems


def main() -> int:
    argv = sys.argv[1:]
    readme = None
    if "--readme" in argv:
        i = argv.index("--readme")
        readme = Path(argv[i + 1])
        del argv[i : i + 2]
    args = [a for a in argv if not a.startswith("--")]
    root = Path(args[0] if args else "host/src")
    crate = Crate(root)
    graph = crate.edges()

    folders: dict[str, dict[str, str]] = {}
    for mod, deps in graph.items():
        top = mod[1] if len(mod) > 1 else "crate"
        for dep, line in deps.items():
            dtop = dep[1] if len(dep) > 1 else "crate"
            if dtop != top:
                folders.setdefault(top, {}).setdefault(dtop, f"{name(mod)}: {line}")
        folders.setdefault(top, {})

    if "--graph" in sys.argv:
        for top in sorted(folders):
            print(f"{top} -> {', '.join(sorted(folders[top])) or '(nothing)'}")

    found = 0
    for level, g, label in (("file", graph, name), ("folder", folders, str)):
        for comp in cycles(g):
            found += 1
            print(f"circle among {level}s: {', '.join(label(m) for m in comp)}")
            members = set(comp)
            for m in comp:
                for dep, line in g[m].items():
                    if dep in members:
                        print(f"    {label(m)} -> {label(dep)}   ({line})")
    if readme is not None:
        found += check_map(readme, folders)
    n_files = len(graph)
    if found:
        print(f"{found} problem(s) among {n_files} modules")
        return 1
    print(f"no import circle among {n_files} modules ({len(folders)} folders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
