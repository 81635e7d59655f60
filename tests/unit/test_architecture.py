"""The architecture as code: no import cycles, torch.cuda only behind providers/, lazy imports only for weight.

The layer order itself is import-linter's contracts in pyproject.toml (`lint-imports`, run by `make test`);
these checks cover what import-linter does not express.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "zmon"
# External modules that may be imported inside a function: heavy (seconds to import) or needed by one
# path only, so that `zmon watch` and `zmon check-config` never load them. torchao is optional (not a dependency):
# only `model.fp8` / the tune's fp8 variant import it, and say so when it is missing.
LAZY_OK = (
    "torch",
    "diffusers",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "PIL",
    "pynvml",
    "importlib",
    "torchao",
)


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out.append((".".join(parts), path))
    return out


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("zmon")


def test_no_import_cycles(graph: grimp.ImportGraph) -> None:
    cycles = []
    for module in graph.modules:
        if module == "zmon":
            continue  # the package root re-exports attach lazily (PEP 562), under TYPE_CHECKING only
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != "zmon" and graph.chain_exists(importer=imported, imported=module):
                cycles.append(f"{module} -> {imported} -> ... -> {module}")
    assert not cycles, "\n".join(sorted(cycles))


def test_torch_cuda_is_called_only_from_providers() -> None:
    offenders = []
    for name, path in _modules():
        if name.startswith("zmon.providers"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            attr = (
                isinstance(node, ast.Attribute)
                and node.attr == "cuda"
                and isinstance(node.value, ast.Name | ast.Attribute)
            )
            chain = ast.unparse(node) if attr else ""
            imported = isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                ("torch.cuda", "torch.backends")
            )
            if chain in ("torch.cuda", "torch.backends.cuda") or imported:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_function_local_imports_only_defer_weight_never_dodge_a_cycle(graph: grimp.ImportGraph) -> None:
    """A function-local import either defers a heavy external package, or is a zmon module that could be
    imported at the top without creating a cycle (the CLI imports each command's code only when run)."""
    bad = []
    for name, path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                targets: list[str] = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    targets = [node.module]
                for target in targets:
                    if target.split(".")[0] in LAZY_OK:
                        continue
                    if not target.startswith("zmon"):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target} lazily")
                    elif graph.chain_exists(importer=target, imported=name):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target} lazily to dodge a cycle")
    assert not bad, "\n".join(bad)


def test_every_package_is_in_a_layer() -> None:
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    named = {part.strip() for layer in layers for part in layer.split("|")}
    top = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "__main__", "version")) or (p / "__init__.py").exists()
    }
    assert top == named, f"not in a layer: {sorted(top - named)}; layers without a package: {sorted(named - top)}"
