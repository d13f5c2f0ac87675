"""The floors of docs/architecture.md: no module imports one above its own (imports inside functions count)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "detrax"
FLOORS = [
    {"errors", "configs"},  # read by every floor (configs validates names against the registries below it)
    {"box_ops", "position_encoding", "attention", "devices", "coco_names"},
    {"keys", "backbone", "bit", "backbones", "transformer", "segmentation", "denoising", "encoder_head",
     "model"},
    {"matching", "loss", "postprocess", "pq", "panoptic"},
    {"data"},
    {"weights", "convert", "flax_detr", "checkpoint"},
    {"optim", "infer", "export", "runtimes", "crop_warmup", "start", "train_step", "reporting", "evaluate",
     "actions", "train", "predict", "attention_maps"},
    {"api", "commands", "cli", "presets", "__init__", "__main__"},
]
CONFIG_REGISTRIES = {"backbones", "matching", "attention"}  # what configs imports to validate a name


def _floor(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"detrax.{module} is on no floor: add it here and to docs/architecture.md")


def test_no_module_imports_a_floor_above_its_own():
    wrong = []
    for path in SRC.rglob("*.py"):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mine = _floor(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("detrax"):
                names = [node.module] if node.module != "detrax" else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("detrax.")]
            for name in names:
                target = name.removeprefix("detrax.") if name != "detrax" else "__init__"
                if module == "configs" and target in CONFIG_REGISTRIES:
                    continue
                if _floor(target) > mine:
                    wrong.append(f"{module} (floor {mine}) imports {target} (floor {_floor(target)})")
    assert not wrong, "\n".join(wrong)
