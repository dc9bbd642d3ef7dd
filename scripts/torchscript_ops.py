#!/usr/bin/python3
"""Lists the TorchScript node kinds a module's code uses, after inlining.

Purpose: keep model/torchscript_allowed_ops.txt (the allow-list of the TorchScript upload
validator) honest. The validator inlines every method of an uploaded module (forward, every
other method, __getstate__/__setstate__, hooks, property getters/setters, every submodule's
methods) and refuses any node kind not on the list; this script does the same walk in Python
so the list can be derived from, and checked against, real models.

For every TorchScript file given, it loads the module on the CPU (as torch.jit.load does, but
keeping the archive's compilation unit) and takes, for every module in named_modules()
(recursively), every method of it (_method_names(), which includes __setstate__ and
__getstate__ when defined), its forward hooks and pre-hooks and its property getters/setters;
then every other function of the compilation unit (methods of TorchScript classes, e.g. a class
attribute's __setstate__ that unpickling runs, or __enter__/__exit__; free functions), listed
as module "<cu>". For each it copies the graph, runs torch._C._jit_pass_inline on the copy and
walks every node, recursing into nested blocks (prim::If, prim::Loop, ...) and into subgraph
attributes (prim::fork's closure, fusion groups, ...).

Output: the sorted set of node kinds, one per line. With --json, a JSON object mapping each
kind to a list of "file:module:method" locations (its first occurrence in each file; the root
module is written "<root>"). With --counts, each kind is followed by the number of nodes of that
kind. With --per-file, a summary line per file (number of methods, nodes and distinct kinds) is
written to stderr. With --check ALLOWLIST, the kinds not on the allow-list (one kind per line,
`#` starts a comment) are printed to stderr with where they occur, and the exit status is 1 if
there are any.

WARNING: torch.jit.load runs a module's __setstate__ (and custom classes' pickle hooks) while it
loads, so only run this on files you would load anyway (the project's own models, test
attack models made in a scratch directory). The server's validator must not rely on loading an
untrusted archive before validating it for the same reason.

Usage:
  /usr/bin/python3 scripts/torchscript_ops.py MODEL.pt [MODEL.pt ...]
  /usr/bin/python3 scripts/torchscript_ops.py --json MODEL.pt ...
  /usr/bin/python3 scripts/torchscript_ops.py --check model/torchscript_allowed_ops.txt MODEL.pt ...
  /usr/bin/python3 scripts/torchscript_ops.py --load-library build/lib/libfpxint_ops.so PACKED.pt

Exit status: 0 on success, 1 if --check found kinds not on the allow-list, 2 if a file could not
be loaded or walked.
"""
import argparse
import json
import sys

import torch


def walk_block(block, visit):
    for node in block.nodes():
        walk_node(node, visit)


def walk_node(node, visit):
    visit(node)
    for b in node.blocks():
        walk_block(b, visit)
    # Subgraph attributes (prim::fork's closure, prim::DifferentiableGraph, fusion groups): walk
    # them too, so nothing hides from the listing.
    for name in node.attributeNames():
        kind = node.kindOf(name)
        if kind == "g":
            g = node.g(name)
            walk_block(g.block(), visit)
        elif kind == "gs":
            for g in node.gs(name):
                walk_block(g.block(), visit)


def inlined(graph):
    g = graph.copy()
    torch._C._jit_pass_inline(g)
    return g


def methods_of(c):
    """Yields (name, graph) for the methods of a torch._C.ScriptModule or ScriptObject."""
    for name in c._method_names():
        try:
            graph = c._get_method(name).graph
        except RuntimeError:  # custom C++ class methods have no graph
            continue
        yield name, graph


def module_functions(module, cu):
    """Yields (module path, function name, graph) for everything callable in a module tree, then
    for every other function of the archive's compilation unit (methods of TorchScript classes,
    whose __setstate__ runs when an object of the class is unpickled; free functions)."""
    seen = set()
    for mpath, sub in module.named_modules():
        c = sub._c
        qual = c._type().qualified_name()
        mpath = mpath or "<root>"
        for name, graph in methods_of(c):
            seen.add(f"{qual}.{name}")
            yield mpath, name, graph
        for hook in c._get_forward_pre_hooks():
            seen.add(hook.qualified_name)
            yield mpath, f"forward_pre_hook:{hook.name}", hook.graph
        for hook in c._get_forward_hooks():
            seen.add(hook.qualified_name)
            yield mpath, f"forward_hook:{hook.name}", hook.graph
        for prop in c._properties():
            for role, fn in (("getter", prop.getter), ("setter", prop.setter)):
                if fn is not None:
                    seen.add(f"{qual}.{fn.name}")
                    yield mpath, f"property:{prop.name}.{role}", fn.graph
    for fn in cu.get_functions():
        if fn.qualified_name not in seen:
            yield "<cu>", fn.qualified_name, fn.graph


def load(path):
    """torch.jit.load, keeping the compilation unit that holds every function of the archive."""
    cu = torch._C.CompilationUnit()
    cpp_module = torch._C.import_ir_module(cu, path, torch.device("cpu"), {})
    return torch.jit._recursive.wrap_cpp_module(cpp_module), cu


def read_allow_list(path):
    allowed = set()
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                allowed.add(line)
    return allowed


def main():
    ap = argparse.ArgumentParser(
        description="List the TorchScript node kinds (after inlining every method, including "
        "__setstate__, hooks and submodules' methods) used by TorchScript files.",
        epilog="Loading runs the module's __setstate__: use only on files you trust.")
    ap.add_argument("files", nargs="+", metavar="FILE", help="TorchScript archives (.pt)")
    ap.add_argument("--json", action="store_true",
                    help='print a JSON object: kind -> ["file:module:method", ...] (first '
                    "occurrence in each file)")
    ap.add_argument("--counts", action="store_true", help="print the number of nodes of each kind")
    ap.add_argument("--per-file", action="store_true",
                    help="write a summary line per file to stderr")
    ap.add_argument("--check", metavar="ALLOWLIST",
                    help="report kinds not on this allow-list (exit status 1 if any)")
    ap.add_argument("--load-library", action="append", default=[], metavar="LIB",
                    help="torch.ops.load_library(LIB) first (e.g. fpxint's op library, for "
                    "packed artifacts); may be repeated")
    args = ap.parse_args()

    for lib in args.load_library:
        torch.ops.load_library(lib)

    where = {}   # kind -> [location per file, first occurrence]
    counts = {}  # kind -> node count over all files
    failed = False
    for path in args.files:
        try:
            module, cu = load(path)
        except Exception as e:  # noqa: BLE001 - report any load error and go on
            first = str(e).strip().splitlines()
            print(f"{path}: cannot load: {first[-1] if first else type(e).__name__}",
                  file=sys.stderr)
            failed = True
            continue
        file_kinds = {}
        n_methods = n_nodes = 0
        try:
            for mpath, name, graph in module_functions(module, cu):
                n_methods += 1
                loc = f"{path}:{mpath}:{name}"

                def visit(node, loc=loc):
                    nonlocal n_nodes
                    n_nodes += 1
                    k = node.kind()
                    counts[k] = counts.get(k, 0) + 1
                    file_kinds.setdefault(k, loc)

                g = inlined(graph)  # keep the graph alive while its blocks are walked
                walk_block(g.block(), visit)
        except Exception as e:  # noqa: BLE001
            print(f"{path}: cannot walk: {e}", file=sys.stderr)
            failed = True
            continue
        for k, loc in file_kinds.items():
            where.setdefault(k, []).append(loc)
        if args.per_file:
            print(f"{path}: {n_methods} methods, {n_nodes} nodes, {len(file_kinds)} kinds",
                  file=sys.stderr)

    kinds = sorted(where)
    if args.json:
        print(json.dumps({k: where[k] for k in kinds}, indent=1))
    elif args.counts:
        for k in kinds:
            print(f"{k}\t{counts[k]}")
    else:
        for k in kinds:
            print(k)

    status = 2 if failed else 0
    if args.check:
        allowed = read_allow_list(args.check)
        bad = [k for k in kinds if k not in allowed]
        for k in bad:
            print(f"NOT ALLOWED: {k} at {', '.join(where[k])}", file=sys.stderr)
        if bad and status == 0:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
