#!/usr/bin/env python3
"""Link ScaNN's TensorFlow ops into a TF Serving source tree (run in the TF Serving devel image).

Written against TF Serving at tag 2.20.0 (commit bc7e9d2b) and google-research at 634a79fb5b4b,
the ScaNN 1.4.2 release; tests/test_scann_build.py runs it on both trees when they are on disk
(`make scann-sources`). The two use different Bazel dependency systems, which decides the
approach:

* TF Serving 2.20 is WORKSPACE-only (its ``.bazelrc`` says ``common --enable_bzlmod=false``;
  Bazel 7.4.1 in the devel image) and builds TensorFlow from source as ``@org_tensorflow``.
* ScaNN 1.4.2 is bzlmod-only (``MODULE.bazel``, no WORKSPACE). Its dependencies come from the
  Bazel Central Registry, and its TensorFlow from ``@local_config_tf``, a repository rule that
  reads the pip-installed TensorFlow.

So ScaNN cannot be added as a Bazel module; instead (what google-research's ``scann/tf_serving``
did up to TF Serving 2.11, redone against the current sources):

1. ScaNN becomes the WORKSPACE repository ``@com_google_scann`` (a ``local_repository``; a
   one-line WORKSPACE is written into the ScaNN tree so Bazel accepts it as one).
2. Every ``bazel_dep``/repository of ScaNN's MODULE.bazel is mapped to what the TF Serving
   workspace provides: abseil, protobuf, zlib, platforms, rules_cc and bazel_skylib are
   TensorFlow's / TF Serving's own (same repository names); ``@eigen`` becomes TensorFlow's
   ``@eigen_archive//:eigen3``; ``@local_config_tf`` becomes the aliases TF Serving's WORKSPACE
   adds to ``@org_tensorflow`` for out-of-tree op libraries (``tensorflow_libtensorflow_framework``
   and ``tensorflow_tf_header_lib``, as TF Text uses them); ``cnpy``, ``highway`` (and
   ``rules_license``, which highway's BUILD loads) are added with ``maybe`` at the pins ScaNN's
   MODULE.bazel names; the Python-only ones (rules_python, pybind11, the Python toolchain) are
   dropped together with the Python targets (``py_*``, ``pybind_*``, ``scann_py_proto_library``,
   whose .bzl loads protobuf's Python rules). A dependency this script does not know stops it,
   naming the dependency, instead of failing hours later inside Bazel.
3. ScaNN's op and kernel libraries (both ``alwayslink``) are added to
   ``SUPPORTED_TENSORFLOW_OPS`` in ``tensorflow_serving/model_servers/BUILD``, the list the
   model server links in (https://www.tensorflow.org/tfx/serving/custom_op).

Usage: ``python3 patch_tf_serving.py SCANN_ROOT TF_SERVING_ROOT`` where SCANN_ROOT is
google-research's ``scann/`` folder (it holds ``MODULE.bazel`` and the ``scann/`` package).
Idempotent; exits non-zero with a message when a source tree does not look as expected (so a
Docker build stops at the step that broke).
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

SCANN_REPO = "com_google_scann"
SCANN_OP_TARGETS = (
    f"@{SCANN_REPO}//scann/scann_ops/cc:scann_ops",
    f"@{SCANN_REPO}//scann/scann_ops/cc:scann_ops_kernels",
)
# @local_config_tf targets -> the aliases TF Serving 2.20's WORKSPACE appends to TensorFlow's root
# BUILD (patch_cmds of `org_tensorflow`), both `//tensorflow/core:tensorflow`.
TF_TARGETS = {
    "libtensorflow_framework": "@org_tensorflow//:tensorflow_libtensorflow_framework",
    "tf_header_lib": "@org_tensorflow//:tensorflow_tf_header_lib",
}
EIGEN = "@eigen_archive//:eigen3"  # TensorFlow's Eigen (XLA's eigen_archive.BUILD)
PY_RULES = frozenset({
    "pybind_library", "pybind_extension", "py_library", "py_binary", "py_test",
    "py_proto_library", "pytype_strict_library", "pytype_strict_binary",
    "scann_py_proto_library",
})
PY_LOAD_REPOS = ("@pybind11_bazel", "@rules_python", "@pybind11")
# Repository names ScaNN's MODULE.bazel makes visible -> how the TF Serving build provides them.
MODULE_REPOS = {
    "com_google_absl": "TensorFlow's workspace",
    "com_google_protobuf": "TensorFlow's workspace",
    "zlib": "TensorFlow's workspace",
    "platforms": "TensorFlow's workspace",
    "bazel_skylib": "TF Serving's WORKSPACE",
    "rules_cc": "TF Serving's WORKSPACE",
    "eigen": f"rewritten to {EIGEN}",
    "local_config_tf": "rewritten to TF Serving's @org_tensorflow aliases",
    "com_google_highway": "added (maybe)",
    "cnpy": "added (maybe)",
    "com_google_googletest": "tests only (TensorFlow defines it too)",
    "rules_python": "Python only: removed",
    "pybind11_bazel": "Python only: removed",
    "local_config_python": "Python only: removed",
    "local_toolchains": "Python only: removed",
}
MARK = "# --- tfrs-coldstart: ScaNN ops for TF Serving ---"
DEFAULT_CNPY = ("https://github.com/sammymax/cnpy.git", "57184ee0db37cac383fc29175950747a46a8b512")
DEFAULT_HIGHWAY = "1.3.0"
# sha256 of github.com/google/highway/archive/refs/tags/<v>.tar.gz (as pinned by TensorFlow/XLA).
HIGHWAY_SHA256 = {"1.3.0": "07b3c1ba2c1096878a85a31a5b9b3757427af963b1141ca904db2f9f4afe0bc2"}
RULES_LICENSE = ("1.0.0", "26d4021f6898e23b82ef953078389dd49ac2b5618ac564ade4ef87cced147b38")


def die(msg: str) -> None:
    print(f"patch_tf_serving: {msg}", file=sys.stderr)
    sys.exit(1)


def _rewrite_labels(text: str, where: str) -> str:
    """ScaNN's bzlmod-only labels -> the TF Serving workspace's repositories."""
    def tf(m: re.Match[str]) -> str:
        target = m.group(1)
        if target not in TF_TARGETS:
            die(f"{where}: unknown TensorFlow target @local_config_tf//:{target}; map it in "
                "TF_TARGETS")
        return f'"{TF_TARGETS[target]}"'

    def eigen(m: re.Match[str]) -> str:
        if m.group(1) not in (None, "eigen", "eigen3"):
            die(f"{where}: unknown Eigen target {m.group(0)}")
        return f'"{EIGEN}"'

    text = re.sub(r'"@local_config_tf//:([\w.-]+)"', tf, text)
    return re.sub(r'"@eigen(?://:([\w.-]+))?"', eigen, text)


def _is_py_load(node: ast.Call) -> tuple[bool, list[ast.keyword], list[ast.expr]]:
    """(drop whole load, kept keyword aliases, kept symbol args) for one ``load(...)`` call."""
    label = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else ""
    syms = [a for a in node.args[1:] if isinstance(a, ast.Constant)]
    kws = list(node.keywords)
    if str(label).startswith(PY_LOAD_REPOS):
        return True, [], []
    keep_syms = [a for a in syms if a.value not in PY_RULES]
    keep_kws = [k for k in kws if not (isinstance(k.value, ast.Constant)
                                       and k.value.value in PY_RULES)]
    return not keep_syms and not keep_kws, keep_kws, keep_syms


def patch_build_text(text: str, where: str = "BUILD") -> str:
    """One ScaNN BUILD file, rewritten to build inside TF Serving's workspace.

    Top-level Python rules and the loads that only bring them are removed by statement (found
    with Python's parser: BUILD files are Starlark, a Python subset); labels are rewritten.
    """
    text = _rewrite_labels(text, where)
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        die(f"{where}: not parseable as Starlark ({e}); ScaNN changed its BUILD syntax")
    lines = text.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []  # (first line, last line, replacement), 1-based
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Name)):
            continue
        call, fn = stmt.value, stmt.value.func.id
        end = stmt.end_lineno or stmt.lineno
        if fn in PY_RULES:
            edits.append((stmt.lineno, end, ""))
        elif fn == "load":
            drop, kws, syms = _is_py_load(call)
            if drop:
                edits.append((stmt.lineno, end, ""))
            elif len(kws) + len(syms) < len(call.keywords) + len(call.args) - 1:
                parts = [json.dumps(a.value) for a in [call.args[0], *syms]] + [
                    f"{k.arg} = {json.dumps(k.value.value)}" for k in kws]  # type: ignore
                edits.append((stmt.lineno, end, f"load({', '.join(parts)})\n"))
    for first, last, new in sorted(edits, reverse=True):
        lines[first - 1:last] = [new] if new else []
    return "".join(lines)


def scann_module(scann_root: Path) -> dict[str, object]:
    """What ScaNN's MODULE.bazel asks for: visible repo names, cnpy pin, highway version."""
    module = scann_root / "MODULE.bazel"
    if not module.is_file():
        die(f"{module} missing: SCANN_ROOT must be google-research's scann/ folder (ScaNN >= 1.4 "
            "builds with bzlmod)")
    text = module.read_text()
    repos: dict[str, str] = {}
    for m in re.finditer(r"bazel_dep\(([^)]*)\)", text):
        args = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', m.group(1)))
        repos[args.get("repo_name", args.get("name", ""))] = args.get("version", "")
    rules = re.findall(r"^(\w+)\s*=\s*use_repo_rule\(", text, re.M)
    for rule in rules:
        for m in re.finditer(rf"^{rule}\(\s*name\s*=\s*\"([^\"]+)\"", text, re.M):
            repos[m.group(1)] = rule
    cnpy = DEFAULT_CNPY
    m = re.search(r'git_repository\(\s*name\s*=\s*"cnpy"\s*,\s*remote\s*=\s*"([^"]+)"\s*,'
                  r'\s*commit\s*=\s*"([0-9a-f]+)"', text)
    if m:
        cnpy = (m.group(1), m.group(2))
    unknown = sorted(set(repos) - set(MODULE_REPOS))
    if unknown:
        die(f"{module}: ScaNN depends on {unknown}, which this script does not know how to "
            "provide in TF Serving's WORKSPACE; add them to MODULE_REPOS / workspace_block()")
    return {"repos": repos, "cnpy": cnpy,
            "highway": repos.get("com_google_highway") or DEFAULT_HIGHWAY}


def patch_scann(scann_root: Path) -> int:
    pkg = scann_root / "scann"
    if not (pkg / "scann_ops" / "cc").is_dir():
        die(f"{scann_root} does not hold ScaNN's sources (no scann/scann_ops/cc)")
    scann_module(scann_root)  # fail early on a dependency we cannot provide
    n = 0
    for build in sorted(pkg.rglob("BUILD*")):
        if build.name not in ("BUILD", "BUILD.bazel"):
            continue
        old = build.read_text()
        new = patch_build_text(old, str(build))
        if new != old:
            build.write_text(new)
            n += 1
    # A WORKSPACE-mode local_repository needs a WORKSPACE file (ScaNN itself has MODULE.bazel).
    ws = scann_root / "WORKSPACE"
    if not ws.exists():
        ws.write_text(f'workspace(name = "{SCANN_REPO}")\n')
    return n


def workspace_block(scann_root: Path) -> str:
    """Appended to TF Serving's WORKSPACE, after TensorFlow's workspace macros ran, so ``maybe``
    keeps TensorFlow's copy of a repository where it already has one. Loads use private aliases:
    the WORKSPACE already loads ``http_archive`` and ``git_repository`` under those names."""
    mod = scann_module(scann_root)
    cnpy_remote, cnpy_commit = mod["cnpy"]  # type: ignore[misc]
    hwy = str(mod["highway"])
    hwy_sha = f'\n    sha256 = "{HIGHWAY_SHA256[hwy]}",' if hwy in HIGHWAY_SHA256 else ""
    lic_v, lic_sha = RULES_LICENSE
    lic_url = (f"https://github.com/bazelbuild/rules_license/releases/download/{lic_v}/"
               f"rules_license-{lic_v}.tar.gz")
    return f"""
{MARK}
load("@bazel_tools//tools/build_defs/repo:http.bzl", _scann_http_archive = "http_archive")
load("@bazel_tools//tools/build_defs/repo:git.bzl", _scann_git_repository = "git_repository")
load("@bazel_tools//tools/build_defs/repo:utils.bzl", _scann_maybe = "maybe")

local_repository(
    name = "{SCANN_REPO}",
    path = "{scann_root}",
)

_scann_maybe(
    _scann_git_repository,
    name = "cnpy",
    commit = "{cnpy_commit}",
    remote = "{cnpy_remote}",
)

_scann_maybe(
    _scann_http_archive,
    name = "com_google_highway",{hwy_sha}
    strip_prefix = "highway-{hwy}",
    urls = ["https://github.com/google/highway/archive/refs/tags/{hwy}.tar.gz"],
)

_scann_maybe(
    _scann_http_archive,
    name = "rules_license",
    sha256 = "{lic_sha}",
    urls = ["{lic_url}"],
)
"""


def patch_serving(serving_root: Path, scann_root: Path) -> None:
    ws = serving_root / "WORKSPACE"
    build = serving_root / "tensorflow_serving" / "model_servers" / "BUILD"
    if not ws.is_file() or not build.is_file():
        die(f"{serving_root} is not a TF Serving source tree (WORKSPACE, "
            "tensorflow_serving/model_servers/BUILD)")
    if (serving_root / "MODULE.bazel").is_file():
        die(f"{serving_root} has a MODULE.bazel: TF Serving moved to bzlmod, so ScaNN should be "
            "added as a bazel_dep/local_path_override there instead of this WORKSPACE block")
    text = ws.read_text()
    for alias in TF_TARGETS.values():
        if alias.split(":")[-1] not in text:
            die(f"{ws}: no '{alias}' alias for out-of-tree op libraries; map "
                "@local_config_tf to another TensorFlow target in TF_TARGETS")
    if MARK not in text:
        ws.write_text(text.rstrip("\n") + "\n" + workspace_block(scann_root))
    text = build.read_text()
    if SCANN_OP_TARGETS[0] in text:
        return
    anchor = "SUPPORTED_TENSORFLOW_OPS = "
    if text.count(anchor) != 1:
        die(f"{build}: expected exactly one '{anchor}...' (the model server's op list); "
            "TF Serving changed: add the ScaNN op targets to the list by hand")
    targets = "".join(f'    "{t}",\n' for t in SCANN_OP_TARGETS)
    build.write_text(text.replace(anchor, f"{anchor}[\n{targets}] + ", 1))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        die("usage: patch_tf_serving.py SCANN_ROOT TF_SERVING_ROOT")
    scann_root, serving_root = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    n = patch_scann(scann_root)
    patch_serving(serving_root, scann_root)
    print(f"patch_tf_serving: {n} ScaNN BUILD files rewritten; ScaNN ops added to "
          f"{serving_root}/tensorflow_serving/model_servers/BUILD")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
