#!/usr/bin/env python3
"""Link ScaNN's TensorFlow ops into a TF Serving source tree (run in the TF Serving devel image).

The approach of google-research's ``scann/tf_serving`` (last published for TF Serving 2.11),
redone as a script so it follows the current sources instead of a fixed-line patch:

1. ScaNN becomes the external Bazel repository ``@com_google_scann`` (a ``local_repository``
   in TF Serving's WORKSPACE), with its own third-party repositories that TF Serving does not
   already define (``cnpy``, ``com_google_highway``; versions read from ScaNN's MODULE.bazel).
2. ScaNN's BUILD files stop depending on the pip-installed TensorFlow (``@local_config_tf``)
   and use TF Serving's in-tree TensorFlow instead (``@org_tensorflow//tensorflow/core:...``);
   ``@eigen`` becomes TensorFlow's ``@eigen_archive``; the Python-binding targets (pybind11,
   rules_python), which the model server does not need, are removed.
3. ScaNN's op and kernel libraries (both ``alwayslink``) are added to
   ``SUPPORTED_TENSORFLOW_OPS`` in ``tensorflow_serving/model_servers/BUILD``, the list the
   model server links in (https://www.tensorflow.org/tfx/serving/custom_op).

Usage: ``python3 patch_tf_serving.py SCANN_ROOT TF_SERVING_ROOT`` where SCANN_ROOT holds
ScaNN's ``MODULE.bazel`` and ``scann/`` package. Idempotent; exits non-zero with a message when
a source tree does not look as expected (so a Docker build stops at the step that broke).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SCANN_OP_TARGETS = (
    "@com_google_scann//scann/scann_ops/cc:scann_ops",
    "@com_google_scann//scann/scann_ops/cc:scann_ops_kernels",
)
DEP_REWRITES = {
    '"@local_config_tf//:libtensorflow_framework"': '"@org_tensorflow//tensorflow/core:framework"',
    '"@local_config_tf//:tf_header_lib"': '"@org_tensorflow//tensorflow/core:lib"',
    '"@eigen"': '"@eigen_archive//:eigen3"',
    '"@eigen//:eigen"': '"@eigen_archive//:eigen3"',
}
PY_RULES = ("pybind_library", "pybind_extension", "py_library", "py_binary", "py_test",
            "py_proto_library", "pytype_strict_library", "pytype_strict_binary")
PY_LOAD_REPOS = ("@pybind11_bazel", "@rules_python")
MARK = "# --- tfrs-coldstart: ScaNN ops for TF Serving ---"
DEFAULT_CNPY = ("https://github.com/sammymax/cnpy.git", "57184ee0db37cac383fc29175950747a46a8b512")
DEFAULT_HIGHWAY = "1.3.0"


def die(msg: str) -> None:
    print(f"patch_tf_serving: {msg}", file=sys.stderr)
    sys.exit(1)


def _drop_call(text: str, rule: str) -> str:
    """Remove every top-level ``rule(...)`` call (balanced parentheses, strings respected)."""
    out, i = [], 0
    pat = re.compile(rf"^{re.escape(rule)}\(", re.M)
    while True:
        m = pat.search(text, i)
        if not m:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:m.start()])
        depth, j, quote = 0, m.end() - 1, None
        while j < len(text):
            c = text[j]
            if quote:
                if c == "\\":
                    j += 1
                elif c == quote:
                    quote = None
            elif c in "\"'":
                quote = c
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        i = j + 1
        if i < len(text) and text[i] == "\n":
            i += 1


def patch_build_text(text: str) -> str:
    """One ScaNN BUILD file, rewritten to build inside TF Serving's workspace."""
    for old, new in DEP_REWRITES.items():
        text = text.replace(old, new)
    lines = []
    for line in text.splitlines(keepends=True):
        m = re.match(r'\s*load\(\s*"([^"]+)"\s*,(.*)\)\s*$', line)
        if m:
            label, rest = m.group(1), m.group(2)
            symbols = re.findall(r'"([^"]+)"', rest)
            if label.startswith(PY_LOAD_REPOS) or (symbols and all(s in PY_RULES for s in symbols)):
                continue
        lines.append(line)
    text = "".join(lines)
    for rule in PY_RULES:
        text = _drop_call(text, rule)
    return text


def patch_scann(scann_root: Path) -> int:
    pkg = scann_root / "scann"
    if not (pkg / "scann_ops" / "cc").is_dir():
        die(f"{scann_root} does not hold ScaNN's sources (no scann/scann_ops/cc)")
    n = 0
    for build in sorted(pkg.rglob("BUILD*")):
        if build.name not in ("BUILD", "BUILD.bazel"):
            continue
        old = build.read_text()
        new = patch_build_text(old)
        if new != old:
            build.write_text(new)
            n += 1
    # An external repository needs a WORKSPACE (ScaNN itself builds with bzlmod).
    ws = scann_root / "WORKSPACE"
    if not ws.exists():
        ws.write_text('workspace(name = "com_google_scann")\n')
    return n


def scann_third_party(scann_root: Path) -> tuple[tuple[str, str], str]:
    """cnpy (remote, commit) and highway version that this ScaNN checkout asks for."""
    module = scann_root / "MODULE.bazel"
    text = module.read_text() if module.is_file() else ""
    cnpy = DEFAULT_CNPY
    m = re.search(r'git_repository\(\s*name\s*=\s*"cnpy"\s*,\s*remote\s*=\s*"([^"]+)"\s*,'
                  r'\s*commit\s*=\s*"([0-9a-f]+)"', text)
    if m:
        cnpy = (m.group(1), m.group(2))
    m = re.search(r'bazel_dep\(\s*name\s*=\s*"highway"\s*,\s*version\s*=\s*"([^"]+)"', text)
    return cnpy, (m.group(1) if m else DEFAULT_HIGHWAY)


def workspace_block(scann_root: Path) -> str:
    (cnpy_remote, cnpy_commit), hwy = scann_third_party(scann_root)
    cnpy_url = cnpy_remote.removesuffix(".git") + f"/archive/{cnpy_commit}.tar.gz"
    repo = cnpy_remote.removesuffix(".git").rstrip("/").rsplit("/", 1)[-1]
    return f"""
{MARK}
load("@bazel_tools//tools/build_defs/repo:http.bzl", "http_archive")
load("@bazel_tools//tools/build_defs/repo:utils.bzl", "maybe")

local_repository(
    name = "com_google_scann",
    path = "{scann_root}",
)

maybe(
    http_archive,
    name = "cnpy",
    strip_prefix = "{repo}-{cnpy_commit}",
    urls = ["{cnpy_url}"],
)

maybe(
    http_archive,
    name = "com_google_highway",
    strip_prefix = "highway-{hwy}",
    urls = ["https://github.com/google/highway/archive/refs/tags/{hwy}.tar.gz"],
)
"""


def patch_serving(serving_root: Path, scann_root: Path) -> None:
    ws = serving_root / "WORKSPACE"
    build = serving_root / "tensorflow_serving" / "model_servers" / "BUILD"
    if not ws.is_file() or not build.is_file():
        die(f"{serving_root} is not a TF Serving source tree (WORKSPACE, "
            "tensorflow_serving/model_servers/BUILD)")
    text = ws.read_text()
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
