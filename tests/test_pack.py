"""Packaging: registry metadata, `comfy node validate`, and the pure-math rule for samplers/."""
import ast
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
PURE_PACKAGES = ("samplers", "toyworld", "diffusers_guiders")  # diffusers_guiders: over diffusers, never ComfyUI
# toyworld v2's models are ComfyUI's own classes (Flux, AutoencoderKL, T5) at a small size, so that the pack's
# block-level code runs on a real family's code: the modules that build, store, train and sample them are the
# one exception (its scenes and oracle stay pure).
BUILT_FROM_COMFYUI = {f"toyworld/v2/{name}.py" for name in ("model", "host", "weights", "train", "sample")}


def test_pure_packages_import_nothing_from_comfyui():
    offenders = []
    for package in PURE_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if str(path.relative_to(REPO)) in BUILT_FROM_COMFYUI:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                              if n.split(".")[0] in {"comfy", "comfy_api", "comfy_extras", "nodes", "folder_paths",
                                                     "server", "execution", "node_helpers"}]
    assert offenders == []


def test_pure_packages_import_without_comfyui_on_the_path(tmp_path):
    """Every module of samplers/ and toyworld/ imports (as the pack, ``guidance_kit.*``) in a fresh interpreter
    that cannot reach ComfyUI."""
    (tmp_path / "guidance_kit").symlink_to(REPO, target_is_directory=True)
    modules = sorted("guidance_kit." + ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                     for package in PURE_PACKAGES for path in (REPO / package).rglob("*.py")
                     if str(path.relative_to(REPO)) not in BUILT_FROM_COMFYUI)
    code = (f"import importlib, sys; sys.path[:] = [{str(tmp_path)!r}] + [p for p in sys.path if p and 'comfy' not in "
            f"p.lower() and p != {str(REPO)!r}]\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "assert not any(m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths') for m in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(modules) > 10


def test_registry_metadata():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "guidance-kit"
    assert meta["project"]["license"] == {"file": "LICENSE"}
    assert "GNU GENERAL PUBLIC LICENSE" in (REPO / "LICENSE").read_text()[:200]
    comfy = meta["tool"]["comfy"]
    assert comfy["DisplayName"] == "Guidance Kit" and comfy["PublisherId"] and comfy["Icon"]
    assert comfy["requires-comfyui"].startswith(">=")


def test_comfy_node_validate_is_clean():
    comfy = Path(sys.executable).parent / "comfy"
    result = subprocess.run([str(comfy), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=REPO,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower() and "error" not in output.lower(), output


def test_tests_run_nodes_as_the_executor_does():
    """Tests call a node through ``harness.executor.run_node`` (inference mode, hidden inputs, node context), never
    its ``execute`` directly: the direct call passed in-process while the server failed (DeeDiff training)."""
    direct = []
    for path in sorted((REPO / "tests").rglob("*.py")) + [REPO / "harness" / "sampling.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            direct_v3 = isinstance(called, ast.Attribute) and called.attr == "execute"
            v1_instance = isinstance(called, ast.Attribute) and isinstance(called.value, ast.Name) and \
                called.value.id == "nodes" and called.attr[:1].isupper()  # nodes.CLIPTextEncode().encode(...)
            if direct_v3 or v1_instance:
                direct.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert direct == [], f"call these nodes through harness.executor.run_node: {direct}"


SHARED_TYPES = {"contract", "classifier"}  # what node modules may import from nodes/: the contract, the CLASSIFIER type


def test_techniques_import_only_the_contract_never_each_other():
    """The import graph of nodes/: every technique module sits over the contract (and shared types), side by
    side; the contract imports nothing from nodes/ outside itself."""
    offenders = []
    for path in sorted((REPO / "nodes").rglob("*.py")):
        in_contract = path.parent.name == "contract"
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            first = (node.module or "").split(".")[0]
            sibling_of_techniques = node.level == (2 if in_contract else 1)
            allowed = set() if in_contract else SHARED_TYPES
            if sibling_of_techniques and first not in allowed:
                offenders.append(f"{path.relative_to(REPO)}: from {'.' * node.level}{node.module}")
    assert offenders == []
