"""Rooms and doors (../shared/STYLE.md, section 4): each module may import only from the rooms listed here.

Arrows point one way: cli -> loop -> everything else -> errors. A new module must be added to ROOMS, which is
the point: deciding where it sits is part of adding it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dpokit"

ROOMS: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "data": {"errors"},
    "batching": {"data"},
    "pair_sampler": {"batching", "data", "errors"},
    "flex_attention": {"batching"},
    "block_attention": {"batching", "flex_attention"},
    "accelerator": {"errors"},
    "vision": {"batching"},
    "quantized_tables": {"errors"},
    "logprobs": {"batching", "block_attention", "quantized_tables", "vision"},
    "fused_head": {"batching", "logprobs", "quantized_tables"},
    "losses": {"logprobs", "errors"},
    "lean_layers": set(),
    "models": {"accelerator", "host_memory", "lean_layers", "quantized_tables", "data", "errors"},
    "run_files": set(),
    "reference": {"batching", "distributed", "logprobs", "pair_sampler", "data", "errors"},
    "objective": {"batching", "config", "fused_head", "logprobs", "losses", "reference", "errors"},
    "placement": {"batching", "config", "data", "distributed", "logprobs", "models", "reference", "vision", "errors"},
    "distributed": {"errors"},
    "checkpoint": {"distributed", "run_files", "errors"},
    "report": {"errors"},
    "trackers": {"report", "errors"},
    "run_folder": {"config", "data", "errors"},
    "model_card": {"data", "report", "errors"},
    "generate": {"batching", "distributed", "models", "data", "vision", "errors"},
    "evaluation": {"distributed", "generate", "models", "logprobs", "batching", "data", "losses", "reference", "config", "errors"},
    "metrics": {"distributed", "logprobs", "losses"},
    "host_memory": set(),
    "health": {"config", "data", "losses"},
    "model_shape": {"errors", "models"},
    "plan": {"batching", "data", "errors", "model_shape", "models", "objective"},
    "loop": {"accelerator", "batching", "checkpoint", "config", "data", "distributed", "errors", "health",
             "host_memory", "metrics", "model_card", "models", "objective", "pair_sampler", "placement", "plan",
             "reference", "report", "run_files", "run_folder", "trackers", "feeds"},
    "feeds": {"batching", "config", "data", "distributed", "objective"},
    "judging": {"data", "distributed", "errors", "generate", "models"},
    "on_policy": {"batching", "config", "data", "distributed", "errors", "feeds", "judging", "objective",
                  "pair_sampler", "placement"},
    "online": {"config", "data", "distributed", "errors", "evaluation", "generate", "judging", "loop", "models",
               "on_policy", "report", "run_folder"},
    "cli": {"*"},
    "__init__": {"*"},
    "__main__": {"cli"},
}
FORBIDDEN_THIRD_PARTY = ("accelerate", "trl")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).with_suffix("")
        parts = relative.parts
        room = parts[0] if len(parts) > 1 else relative.name  # a sub-package is one room
        found.setdefault(room, path)
        found[f"{room}:{relative}"] = path
    return found


def _imported_rooms(path: Path) -> tuple[set[str], set[str]]:
    """Rooms of dpokit imported by the file, and third-party top-level packages."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside_package = path.parent != PACKAGE
    rooms, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1 and not inside_package or node.level == 2 and inside_package:
                if module:
                    rooms.add(module.split(".")[0])
                else:
                    rooms.update(alias.name for alias in node.names)
            elif node.level == 0 and module.startswith("dpokit"):
                rest = module.split(".")[1:]
                rooms.update([rest[0]] if rest else [a.name for a in node.names])
            elif node.level == 0:
                external.add(module.split(".")[0])
                if module == "transformers" and any(a.name == "Trainer" for a in node.names):
                    external.add("transformers.Trainer")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dpokit."):
                    rooms.add(alias.name.split(".")[1])
                else:
                    external.add(alias.name.split(".")[0])
    return rooms, external


def test_every_module_has_a_room():
    rooms = {name for name in _modules() if ":" not in name}
    assert rooms - set(ROOMS) == set(), "add new modules to ROOMS in tests/test_architecture.py"


@pytest.mark.parametrize("key", sorted(k for k in _modules() if ":" in k))
def test_module_imports_only_allowed_rooms(key):
    room = key.split(":")[0]
    allowed = ROOMS.get(room, set())
    rooms, external = _imported_rooms(_modules()[key])
    rooms.discard(room)
    if "*" not in allowed:
        assert rooms <= allowed, f"{key} imports {sorted(rooms - allowed)}, outside its doors {sorted(allowed)}"
    # Only the commands run training: cli, and online, which drives `loop.train` once per round.
    for room_name in ("cli", "loop"):
        if room not in ("cli", "__init__", "__main__") and not (room_name == "loop" and room in ("cli", "online")):
            assert room_name not in rooms or room == "cli", f"{key} must not import {room_name}"
    assert not external & {*FORBIDDEN_THIRD_PARTY, "transformers.Trainer"}, f"{key} imports a trainer framework"


def test_losses_do_not_import_torch_distributed():
    for path in [p for k, p in _modules().items() if k.startswith("losses:")]:
        assert "torch.distributed" not in path.read_text(encoding="utf-8")


TORCH_FREE = ("data", "config", "errors", "report", "trackers", "model_card", "run_folder")


@pytest.mark.parametrize("key", sorted(k for k in _modules() if ":" in k and k.split(":")[0] in TORCH_FREE))
def test_torch_free_rooms_import_no_torch(key):
    """The data rooms (and config, reporting) import no torch, so `dpo data inspect` and `import dpokit` stay light."""
    _, external = _imported_rooms(_modules()[key])
    assert not external & {"torch", "transformers", "peft"}, f"{key} imports {sorted(external)}"
