"""The ScaNN image's build recipe (Dockerfile stage `scann-build`) checked without Docker:
serving/scann/patch_tf_serving.py run on TF Serving at 2.20.0 and google-research at the ScaNN
1.4.2 commit, the result parsed and its Bazel labels resolved against the trees.

The source trees come from `make scann-sources` (../sources/serving-2.20.0 and
../sources/google-research-scann next to the repository) or from $TFRS_COLDSTART_TF_SERVING_SRC
and $TFRS_COLDSTART_SCANN_SRC; tests that need a tree skip, naming it, when it is absent. The
trees are never modified: the files the script rewrites are copied to a temporary folder first.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

SCRIPT = REPO / "serving" / "scann" / "patch_tf_serving.py"
TF_SERVING_TAG = "2.20.0"
OP_TARGETS = ("@com_google_scann//scann/scann_ops/cc:scann_ops",
              "@com_google_scann//scann/scann_ops/cc:scann_ops_kernels")
# Scann ops in a ScaNN export's graph (TFRS's ScaNN layer: the searcher is rebuilt from its
# variables, then searched in batches; tests/test_export.py checks the exports use the first).
EXPORT_SCANN_OPS = ("Scann>ScannSearchBatched", "Scann>TensorsToScann")
# Repositories the patched ScaNN targets may name: TensorFlow's / TF Serving's own, and the ones
# the script adds. Anything else would be an undefined repository in TF Serving's WORKSPACE.
WORKSPACE_REPOS = {"bazel_tools", "com_google_absl", "com_google_protobuf", "zlib",
                   "org_tensorflow", "eigen_archive", "platforms", "bazel_skylib", "rules_cc",
                   "cnpy", "com_google_highway"}
# The files of TF Serving the script reads or writes (copied, then patched).
SERVING_FILES = ("WORKSPACE", ".bazelrc", "tensorflow_serving/model_servers/BUILD")


def _tree(env: str, default: Path, marker: str, what: str) -> Path:
    path = Path(os.environ.get(env) or default)
    if not (path / marker).exists():
        pytest.skip(f"{what} not found at {path} (`make scann-sources`, or set {env})")
    return path


@pytest.fixture(scope="module")
def serving_src() -> Path:
    """TF Serving source tree at the tag the Dockerfile builds."""
    return _tree("TFRS_COLDSTART_TF_SERVING_SRC",
                 REPO.parent / "sources" / f"serving-{TF_SERVING_TAG}",
                 "tensorflow_serving/model_servers/BUILD", f"TF Serving {TF_SERVING_TAG} sources")


@pytest.fixture(scope="module")
def scann_src() -> Path:
    """google-research's scann/ folder (MODULE.bazel + the scann/ package) at SCANN_COMMIT;
    the variable may name the checkout or its scann/ folder."""
    root = _tree("TFRS_COLDSTART_SCANN_SRC", REPO.parent / "sources" / "google-research-scann",
                 ".", "ScaNN sources")
    for cand in (root / "scann", root):
        if (cand / "MODULE.bazel").is_file() and (cand / "scann" / "scann_ops" / "cc").is_dir():
            return cand
    pytest.skip(f"ScaNN sources not found at {root} (`make scann-sources`, or set "
                "TFRS_COLDSTART_SCANN_SRC)")


def run_patch(scann: Path, serving: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), str(scann), str(serving)],
                          capture_output=True, text=True)


def copy_serving(src: Path, dst: Path) -> Path:
    for rel in SERVING_FILES:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    return dst


def copy_scann_bazel_files(src: Path, dst: Path) -> Path:
    """MODULE.bazel and every BUILD/.bzl file of the ScaNN tree (what the script rewrites)."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "MODULE.bazel", dst / "MODULE.bazel")
    for f in (src / "scann").rglob("*"):
        if f.name in ("BUILD", "BUILD.bazel") or f.suffix == ".bzl":
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst / f.relative_to(src))
    return dst


def write_mini_scann(root: Path, module_extra: str = "") -> Path:
    """A miniature ScaNN tree in 1.4.2's layout: bzlmod deps, TensorFlow through
    oss_wrappers:tf_dependency, Python protos through scann_py_proto_library."""
    (root / "scann" / "scann_ops" / "cc").mkdir(parents=True)
    (root / "scann" / "oss_wrappers").mkdir(parents=True)
    (root / "MODULE.bazel").write_text(
        'bazel_dep(name = "rules_python", version = "1.5.1")\n'
        'bazel_dep(name = "abseil-cpp", version = "1", repo_name = "com_google_absl")\n'
        'bazel_dep(name = "eigen", version = "4")\n'
        'bazel_dep(name = "highway", version = "1.3.0", repo_name = "com_google_highway")\n'
        'tf_configure = use_repo_rule("//build_deps/tf_dependency:tf_configure.bzl", '
        '"tf_configure")\n'
        'git_repository = use_repo_rule("@bazel_tools//tools/build_defs/repo:git.bzl", '
        '"git_repository")\n'
        'tf_configure(\n  name = "local_config_tf",\n)\n'
        'git_repository(\n  name = "cnpy",\n  remote = "https://github.com/x/cnpy.git",\n'
        '  commit = "abc123",\n)\n' + module_extra)
    (root / "scann" / "oss_wrappers" / "BUILD.bazel").write_text(
        'load("@rules_cc//cc:defs.bzl", "cc_library")\n'
        'load("//scann/oss_wrappers:build_defs.bzl", "scann_py_proto_library")\n\n'
        'cc_library(\n    name = "tf_dependency",\n    deps = [\n'
        '        "@local_config_tf//:libtensorflow_framework",\n'
        '        "@local_config_tf//:tf_header_lib",\n    ],\n)\n\n'
        'cc_library(\n    name = "scann_threadpool",\n    deps = ["@eigen"],\n)\n\n'
        'scann_py_proto_library(\n    name = "x_py_pb2",\n    srcs = ["x.proto"],\n)\n')
    (root / "scann" / "scann_ops" / "cc" / "BUILD.bazel").write_text(
        'load(\n    "@pybind11_bazel//:build_defs.bzl",\n    "pybind_library",\n)\n'
        'load("@rules_cc//cc:defs.bzl", "cc_library", "py_library")\n\n'
        'cc_library(\n    name = "scann_ops",\n    srcs = ["ops/scann_ops.cc"],\n'
        '    deps = ["//scann/oss_wrappers:tf_dependency"],\n    alwayslink = 1,\n)\n\n'
        'cc_library(\n    name = "scann_ops_kernels",\n    deps = ["@eigen//:eigen"],\n'
        '    alwayslink = 1,\n)\n\n'
        'pybind_library(\n    name = "scann_npy",\n    srcs = ["scann_npy.cc"],\n'
        '    copts = ["-DX=\\")\\""],\n)\n')
    return root


def write_mini_serving(root: Path) -> Path:
    """TF Serving's three patched files, reduced to what the script relies on."""
    (root / "tensorflow_serving" / "model_servers").mkdir(parents=True)
    (root / "WORKSPACE").write_text(
        'workspace(name = "tf_serving")\n'
        'load("@bazel_tools//tools/build_defs/repo:http.bzl", "http_archive")\n'
        'PATCH_CMDS = ["alias(name = \\"tensorflow_libtensorflow_framework\\")",\n'
        '              "alias(name = \\"tensorflow_tf_header_lib\\")"]\n')
    (root / ".bazelrc").write_text("common --enable_bzlmod=false\n")
    (root / "tensorflow_serving" / "model_servers" / "BUILD").write_text(
        'SUPPORTED_TENSORFLOW_OPS = if_v2([]) + [\n    "@x//y:z",\n]\n')
    return root


def supported_ops(build_text: str) -> list[str]:
    """SUPPORTED_TENSORFLOW_OPS of model_servers/BUILD, evaluated (TF2 build)."""
    for node in ast.parse(build_text).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == \
                "SUPPORTED_TENSORFLOW_OPS":
            expr = ast.Expression(node.value)
            return eval(compile(expr, "BUILD", "eval"),  # noqa: S307 (our own parsed list)
                        {"__builtins__": {}, "if_v2": lambda x: x, "if_not_v2": lambda x: []})
    raise AssertionError("no SUPPORTED_TENSORFLOW_OPS")


def workspace_calls(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Top-level calls of a WORKSPACE: (function, its literal keyword arguments + "_args")."""
    out = []
    for node in ast.parse(text).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            kw: dict[str, Any] = {"_args": [ast.unparse(a) for a in node.value.args]}
            for k in node.value.keywords:
                with contextlib.suppress(ValueError):  # non-literal arguments are skipped
                    kw[str(k.arg)] = ast.literal_eval(k.value)
            out.append((ast.unparse(node.value.func), kw))
    return out


def load_bindings(text: str) -> list[str]:
    """Names the top-level ``load()`` statements of a WORKSPACE/BUILD file bind, in order."""
    out = []
    for node in ast.parse(text).body:
        call = getattr(node, "value", None)
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "load":
            out += [a.value for a in call.args[1:] if isinstance(a, ast.Constant)]
            out += [str(k.arg) for k in call.keywords]
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# The script on miniature trees (always runs)


def test_patch_script_on_miniature_trees(tmp_path: Path) -> None:
    scann = write_mini_scann(tmp_path / "scann")
    serving = write_mini_serving(tmp_path / "serving")
    for _ in range(2):  # idempotent
        proc = run_patch(scann, serving)
        assert proc.returncode == 0, proc.stderr
    ops_build = (scann / "scann" / "scann_ops" / "cc" / "BUILD.bazel").read_text()
    wrappers = (scann / "scann" / "oss_wrappers" / "BUILD.bazel").read_text()
    for text in (ops_build, wrappers):
        ast.parse(text)
        assert not re.search(r"local_config_tf|pybind|py_library|py_pb2|build_defs|\"@eigen[\"/]",
                             text), text
    assert 'load("@rules_cc//cc:defs.bzl", "cc_library")' in ops_build  # py symbol dropped
    assert '"@org_tensorflow//:tensorflow_libtensorflow_framework"' in wrappers
    assert '"@org_tensorflow//:tensorflow_tf_header_lib"' in wrappers
    assert wrappers.count('"@eigen_archive//:eigen3"') == 1
    assert ops_build.count('"@eigen_archive//:eigen3"') == 1
    assert 'name = "scann_ops"' in ops_build and 'name = "scann_ops_kernels"' in ops_build
    ws = (serving / "WORKSPACE").read_text()
    calls = workspace_calls(ws)
    repos = {kw.get("name"): (fn, kw) for fn, kw in calls if "name" in kw}
    assert repos["com_google_scann"] == ("local_repository",
                                         {"_args": [], "name": "com_google_scann",
                                          "path": str(scann)})
    assert repos["cnpy"][1]["commit"] == "abc123"
    assert repos["cnpy"][1]["_args"] == ["_scann_git_repository"]
    assert repos["com_google_highway"][1]["strip_prefix"] == "highway-1.3.0"
    assert len(repos["com_google_highway"][1]["sha256"]) == 64
    assert "rules_license" in repos  # highway's BUILD loads it
    # the block's loads are aliased: http_archive (loaded by TF Serving's WORKSPACE) bound once
    bound = load_bindings(ws)
    assert "http_archive" in bound and len(bound) == len(set(bound)), bound
    assert (scann / "WORKSPACE").read_text() == 'workspace(name = "com_google_scann")\n'
    ops = supported_ops((serving / "tensorflow_serving/model_servers/BUILD").read_text())
    assert ops == [*OP_TARGETS, "@x//y:z"]


def test_patch_script_stops_on_what_it_cannot_map(tmp_path: Path) -> None:
    """A ScaNN dependency it does not know, a bzlmod TF Serving, a non-TF-Serving folder and a
    TF Serving without the op-library aliases each stop the script with a message."""
    scann = write_mini_scann(tmp_path / "scann",
                             'bazel_dep(name = "onetbb", version = "2022.0")\n')
    serving = write_mini_serving(tmp_path / "serving")
    proc = run_patch(scann, serving)
    assert proc.returncode == 1 and "['onetbb']" in proc.stderr, proc.stderr
    assert "SUPPORTED" not in proc.stdout
    scann2 = write_mini_scann(tmp_path / "scann2")
    (serving / "MODULE.bazel").write_text("")
    proc = run_patch(scann2, serving)
    assert proc.returncode == 1 and "bzlmod" in proc.stderr, proc.stderr
    (serving / "MODULE.bazel").unlink()
    (serving / "WORKSPACE").write_text('workspace(name = "tf_serving")\n')
    proc = run_patch(scann2, serving)
    assert proc.returncode == 1 and "tensorflow_libtensorflow_framework" in proc.stderr
    bad = tmp_path / "not_serving"
    bad.mkdir()
    proc = run_patch(scann2, bad)
    assert proc.returncode == 1 and "not a TF Serving source tree" in proc.stderr


def test_scann_commit_is_pinned_alike() -> None:
    """The Dockerfile builds the commit `make scann-sources` checks out, at the same TF Serving."""
    docker = (REPO / "Dockerfile").read_text()
    make = (REPO / "Makefile").read_text()
    arg = re.search(r"^ARG SCANN_COMMIT=(\S+)$", docker, re.M)
    pin = re.search(r"^SCANN_COMMIT \?= (\S+)$", make, re.M)
    assert arg and pin and re.fullmatch(r"[0-9a-f]{40}", arg.group(1)), "pin SCANN_COMMIT"
    assert arg.group(1) == pin.group(1)
    tfs = re.search(r"^ARG TF_SERVING_VERSION=(\S+)$", docker, re.M)
    assert tfs and tfs.group(1) == TF_SERVING_TAG
    assert re.search(rf"^TF_SERVING_TAG \?= {re.escape(TF_SERVING_TAG)}$", make, re.M)
    # ScaNN's own compile flags reach its files under the repository name the script gives it
    assert "--per_file_copt=external/com_google_scann/" in docker
    assert 'SCANN_REPO = "com_google_scann"' in SCRIPT.read_text()


# ------------------------------------------------------------------------------------------------
# The real TF Serving tree


def test_tf_serving_sources_fit_the_approach(serving_src: Path) -> None:
    """What the recipe assumes of TF Serving 2.20.0, read from its sources."""
    version = (serving_src / "tensorflow_serving/model_servers/version.h").read_text()
    assert re.search(r"MAJOR_VERSION 2\b", version) and re.search(r"MINOR_VERSION 20\b", version)
    # WORKSPACE-only build: ScaNN has to come in as a WORKSPACE repository, not a bazel_dep
    assert not (serving_src / "MODULE.bazel").exists()
    assert re.search(r"^common --enable_bzlmod=false$", (serving_src / ".bazelrc").read_text(),
                     re.M)
    # the devel image: Bazel 7 and the sources at /tensorflow-serving (the Dockerfile patches there)
    devel = (serving_src / "tensorflow_serving/tools/docker/Dockerfile.devel").read_text()
    assert re.search(r"^ENV BAZEL_VERSION 7\.", devel, re.M)
    assert "WORKDIR /tensorflow-serving" in devel
    # the aliases the script maps @local_config_tf onto are added to TensorFlow's root BUILD
    ws = (serving_src / "WORKSPACE").read_text()
    for alias in ("tensorflow_libtensorflow_framework", "tensorflow_tf_header_lib"):
        assert re.search(rf'alias\(name = \\+"{alias}\\+", actual = \\+"//tensorflow/core:'
                         r'tensorflow\\+"', ws), alias
    build = (serving_src / "tensorflow_serving/model_servers/BUILD").read_text()
    assert build.count("SUPPORTED_TENSORFLOW_OPS = ") == 1
    assert "] + SUPPORTED_TENSORFLOW_OPS," in build  # linked into server_lib


def test_patch_applies_to_tf_serving_sources(serving_src: Path, tmp_path: Path) -> None:
    """The script on copies of TF Serving 2.20.0's files (with a miniature ScaNN tree)."""
    before = {rel: _sha(serving_src / rel) for rel in SERVING_FILES}
    serving = copy_serving(serving_src, tmp_path / "serving")
    scann = write_mini_scann(tmp_path / "scann")
    proc = run_patch(scann, serving)
    assert proc.returncode == 0, proc.stderr
    assert before == {rel: _sha(serving_src / rel) for rel in SERVING_FILES}  # originals intact
    _check_patched_serving(serving_src, serving, scann)


def _check_patched_serving(serving_src: Path, serving: Path, scann: Path) -> None:
    original = (serving_src / "WORKSPACE").read_text()
    ws = (serving / "WORKSPACE").read_text()
    assert ws.startswith(original.rstrip("\n"))  # appended, nothing else touched
    calls = workspace_calls(ws)
    names = [fn for fn, _ in calls]
    block = names.index("local_repository", names.index("tf_workspace0"))
    assert block > names.index("nccl_configure")  # after every TensorFlow workspace macro
    ours = {kw["name"]: (fn, kw) for fn, kw in calls[block:] if "name" in kw}
    assert set(ours) == {"com_google_scann", "cnpy", "com_google_highway", "rules_license"}
    assert ours["com_google_scann"][1]["path"] == str(scann)
    # the unconditional one must be new; the others are `maybe` (TensorFlow's copy wins)
    defined = set(re.findall(r'name = "([\w.-]+)"', original + (
        serving_src / "tensorflow_serving/workspace.bzl").read_text()))
    assert "com_google_scann" not in defined
    assert all(fn == "_scann_maybe" for n, (fn, _) in ours.items() if n != "com_google_scann")
    # the block's loads bind names the WORKSPACE does not bind already
    before, after = load_bindings(original), load_bindings(ws)
    assert after[:len(before)] == before and not set(after[len(before):]) & set(before)
    build_src = (serving_src / "tensorflow_serving/model_servers/BUILD").read_text()
    build = (serving / "tensorflow_serving/model_servers/BUILD").read_text()
    ops, ops_src = supported_ops(build), supported_ops(build_src)
    assert ops == [*OP_TARGETS, *ops_src] and ops_src  # TF Text, TF-DF kept
    assert "] + SUPPORTED_TENSORFLOW_OPS," in build


# ------------------------------------------------------------------------------------------------
# Both real trees


class _Package(dict):
    """Names a BUILD file sees when evaluated as Python: rules record their arguments."""

    def __init__(self, pkg_dir: Path) -> None:
        super().__init__()
        self.rules: dict[str, tuple[str, dict[str, Any]]] = {}
        self.loads: list[str] = []
        self.globbed: list[str] = []
        self.pkg_dir = pkg_dir
        self.update(load=self._load, glob=self._glob, select=self._select, package=_noop,
                    licenses=_noop, exports_files=_noop, len=len, dict=dict, list=list,
                    str=str, sorted=sorted, enumerate=enumerate, range=range)

    def __missing__(self, kind: str) -> Any:
        def rule(**kw: Any) -> None:
            self.rules[kw.get("name", "")] = (kind, kw)
        return rule

    def _load(self, label: str, *syms: str, **aliases: str) -> None:
        self.loads.append(label)
        for s in syms:
            self[s] = self.__missing__(s)
        for a in aliases:
            self[a] = self.__missing__(a)

    def _glob(self, include: list[str], exclude: list[str] = (), **_: Any) -> list[str]:
        got = {str(p.relative_to(self.pkg_dir)) for pat in include for p in self.pkg_dir.glob(pat)}
        got -= {str(p.relative_to(self.pkg_dir)) for pat in exclude for p in self.pkg_dir.glob(pat)}
        self.globbed += include
        return sorted(got)

    @staticmethod
    def _select(choices: dict[str, Any], **_: Any) -> Any:
        vals = list(choices.values())
        if all(isinstance(v, list) for v in vals):
            return [x for v in vals for x in v]
        return vals[0]


def _noop(*_: Any, **__: Any) -> None:
    return None


def _label(label: str, pkg: str) -> tuple[str, str, str]:
    """(repository, package, target) of a Bazel label written in package ``pkg``."""
    if label.startswith("@"):
        repo, _, rest = label[1:].partition("//")
        return repo, "", rest
    if label.startswith(":"):
        return "", pkg, label[1:]
    if label.startswith("//"):
        path, _, target = label[2:].partition(":")
        return "", path, target or path.rsplit("/", 1)[-1]
    return "", pkg, label  # a file or target of the same package


def _closure(patched: Path, original: Path) -> dict[str, Any]:
    """Walk the op targets' dependencies through the patched ScaNN BUILD files."""
    packages: dict[str, _Package] = {}
    problems: list[str] = []
    external: dict[str, set[str]] = {}
    seen: set[tuple[str, str]] = set()
    todo = [_label(t.split("@com_google_scann")[1], "")[1:] for t in OP_TARGETS]
    while todo:
        pkg, name = todo.pop()
        if (pkg, name) in seen:
            continue
        seen.add((pkg, name))
        if pkg not in packages:
            build = next((patched / pkg / b for b in ("BUILD.bazel", "BUILD")
                          if (patched / pkg / b).is_file()), None)
            if build is None:
                problems.append(f"//{pkg}: no BUILD file")
                packages[pkg] = _Package(original / pkg)
                continue
            env = packages[pkg] = _Package(original / pkg)
            exec(compile(build.read_text(), str(build), "exec"),  # noqa: S102 (ScaNN's BUILD)
                 {"__builtins__": {}}, env)
        env = packages[pkg]
        if name not in env.rules:
            if (original / pkg / name).is_file():
                continue  # a source file named by label
            problems.append(f"//{pkg}:{name}: no such target")
            continue
        _, kw = env.rules[name]
        for attr in ("srcs", "hdrs", "textual_hdrs", "deps"):
            for dep in kw.get(attr) or []:
                repo, dpkg, target = _label(dep, pkg)
                if repo:
                    external.setdefault(repo, set()).add(f"//{pkg}:{name} -> {dep}")
                elif attr == "deps" or dep.startswith((":", "//")):
                    todo.append((dpkg, target))
                elif not (original / pkg / dep).is_file():
                    problems.append(f"//{pkg}:{name}: {attr} file {dep} missing")
    return {"packages": packages, "problems": problems, "external": external, "targets": seen}


def _register_ops(cc: str) -> dict[str, tuple[list[str], list[str]]]:
    """REGISTER_OP("name") -> (input args, output args) as 'name:type' strings."""
    out = {}
    norm = {"float": "float32", "double": "float64"}
    for m in re.finditer(r'REGISTER_OP\("([^"]+)"\)(.*?);', cc, re.S):
        args = {kind: [":".join(norm.get(p.strip(), p.strip()) for p in a.split(":"))
                       for a in re.findall(rf'\.{kind}\("([^"]+)"\)', m.group(2))]
                for kind in ("Input", "Output")}
        out[m.group(1)] = (args["Input"], args["Output"])
    return out


def test_patch_against_real_sources(serving_src: Path, scann_src: Path, tmp_path: Path) -> None:
    """The Docker build's patch step on TF Serving 2.20.0 and ScaNN at SCANN_COMMIT: it applies,
    every target the two op libraries depend on exists with its files, every repository they
    name is one TF Serving's WORKSPACE defines, and the ops they register are the ones the
    exported models use, with the signatures the installed ScaNN wheel registers."""
    pyproject = scann_src / "pyproject.toml"
    if pyproject.is_file():  # the checkout is the release the models were exported with
        assert re.search(r'^version = "1\.4\.2"$', pyproject.read_text(), re.M)
    scann = copy_scann_bazel_files(scann_src, tmp_path / "scann")
    serving = copy_serving(serving_src, tmp_path / "serving")
    proc = run_patch(scann, serving)
    assert proc.returncode == 0, proc.stderr
    _check_patched_serving(serving_src, serving, scann)

    walk = _closure(scann, scann_src)
    assert not walk["problems"], walk["problems"][:20]
    assert len(walk["targets"]) > 20  # ScaNN's search stack, not just the two op targets
    assert set(walk["external"]) <= WORKSPACE_REPOS, {
        r: sorted(v)[:3] for r, v in walk["external"].items() if r not in WORKSPACE_REPOS}
    assert "org_tensorflow" in walk["external"]  # TensorFlow through TF Serving's aliases
    for pkg, env in walk["packages"].items():
        for label in env.loads:  # every .bzl a loaded package needs is there
            repo, lpkg, file = _label(label, pkg)
            assert repo in ("", "bazel_tools", "rules_cc", "com_google_protobuf",
                            "bazel_skylib"), f"//{pkg} loads {label}"
            if not repo:
                assert (scann_src / lpkg / file).is_file(), f"//{pkg} loads {label}"

    ops_cc = (scann_src / "scann/scann_ops/cc/ops/scann_ops.cc").read_text()
    kernels_cc = (scann_src / "scann/scann_ops/cc/kernels/scann_ops.cc").read_text()
    rules = walk["packages"]["scann/scann_ops/cc"].rules
    assert "ops/scann_ops.cc" in rules["scann_ops"][1]["srcs"]
    assert "kernels/scann_ops.cc" in rules["scann_ops_kernels"][1]["srcs"]
    source_ops = _register_ops(ops_cc)
    kernels = set(re.findall(r'REGISTER_KERNEL_BUILDER\(\s*Name\("([^"]+)"\)', kernels_cc))
    assert set(EXPORT_SCANN_OPS) <= set(source_ops) and set(EXPORT_SCANN_OPS) <= kernels

    from tensorflow.python.framework import op_def_registry

    from tfrs_coldstart.serving.saved_model import import_scann

    import_scann()  # the wheel's op library, as an export loads it
    for name, (inputs, outputs) in source_ops.items():
        od = op_def_registry.get(name)
        assert od is not None, f"{name}: built from source but not in the installed wheel"
        wheel = ([f"{a.name}:{_dtype(a.type)}" for a in od.input_arg],
                 [f"{a.name}:{_dtype(a.type)}" for a in od.output_arg])
        assert wheel == (inputs, outputs), name


def _dtype(enum: int) -> str:
    import tensorflow as tf

    return tf.dtypes.as_dtype(enum).name if enum else "?"
