"""Data flows one way (DESIGN.md): each module imports only from modules above it."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tachylm"
# Top to bottom. kernels/ imports nothing of tachylm; the model (decode attention) and the
# quantized Linears call it.
LAYERS = ["config", "kernels", "checkpoints", "tokenizer", "chat", "model", "cache", "quant", "build",
          "evaluate", "sampling", "steps", "generate", "engine"]
FRONT_ENDS = {"bench", "cli_bench", "cli_quant", "cli", "__main__"}


def _layer(module: str) -> str:
    """'tachylm.checkpoints.hf' -> 'checkpoints'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set()
    for node in ast.walk(tree):  # imports under `if TYPE_CHECKING:` never run
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skipped.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tachylm"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tachylm"))
    return found


def test_every_module_has_a_known_place():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        name = rel.parts[0].removesuffix(".py")
        assert name in LAYERS or name in FRONT_ENDS or name == "__init__", f"{rel} is not in LAYERS"


def test_imports_only_point_up():
    problems = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        own = rel.parts[0].removesuffix(".py")
        if own in FRONT_ENDS or own == "__init__":
            continue
        for module in _runtime_imports(path):
            target = _layer(module)
            if target in FRONT_ENDS:
                problems.append(f"{rel} imports the front end {module}")
            elif target and target != own and LAYERS.index(target) > LAYERS.index(own):
                problems.append(f"{rel} imports {module}, which is below it")
    assert not problems, "\n".join(problems)
