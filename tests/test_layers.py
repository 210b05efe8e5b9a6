"""The package layout is the architecture: imports only go down (blocks/kernels -> models/data ->
shared services -> training | evaluation -> orchestration/CLIs), and training and evaluation never
import each other. Checked on the source with ``ast`` so a lazy import inside a function counts."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "scse_seg"

# lower number = lower layer; a module may import only its own layer or lower ones
LAYERS = {
    "errors": 0, "failpoints": 0, "runtime": 0, "blocks": 0, "kernels": 0,
    "plug": 1, "models": 1, "data": 1, "config": 1,
    "metrics": 2, "inference": 2, "fileio": 2, "postprocess": 2, "predictor": 2, "export": 2,
    "training": 3, "evaluation": 3,
}
SIDE_BY_SIDE = {("training", "evaluation"), ("evaluation", "training")}


def _top(module_file: Path) -> str:
    rel = module_file.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_tops(path: Path):
    tree = ast.parse(path.read_text())
    depth_of_pkg = len(path.relative_to(PKG).parts) - 1  # 0 for scse_seg/x.py
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb to the package root
                up = node.level - 1
                if up < depth_of_pkg:
                    continue  # import inside the same subpackage
                mod = (node.module or "").split(".")
                names = [mod[0]] if mod[0] else [a.name for a in node.names]
                yield from (n for n in names if n)
            elif node.module and node.module.startswith("scse_seg."):
                yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("scse_seg."):
                    yield a.name.split(".")[1]


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if _top(p) in LAYERS)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_only_go_down(path):
    me = _top(path)
    for other in set(_imported_tops(path)):
        if other not in LAYERS or other == me:
            continue
        assert (me, other) not in SIDE_BY_SIDE, f"{path.relative_to(PKG)} imports {other}"
        assert LAYERS[other] <= LAYERS[me], \
            f"{path.relative_to(PKG)} (layer {LAYERS[me]}) imports {other} (layer {LAYERS[other]})"
