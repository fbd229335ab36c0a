"""The package layout holds: imports run one way between rooms, a module imports the project's modules at its top
(where a reader sees what it depends on) but for the few on-demand imports named below, and what planning and dry
runs read imports no torch."""
from __future__ import annotations

import ast
import subprocess
import sys

from spawn import REPO, child_env

PACKAGES = ("pretrain", "data_pipeline", "launch")
# Imports inside functions that stay, and why: each loads heavy libraries only the command that needs them pays.
ON_DEMAND = {
    "pretrain/cli.py": "each subcommand's modules (torch, DeepSpeed, transformers' formats) load when it runs: "
                       "`plan`, `--dry-run` and `--help` import no torch, and signal handlers are installed first",
    "data_pipeline/cli.py": "the same for `pretrain-data`'s subcommands (pyarrow, tokenizer training)",
    "pretrain/checkpoint/weights.py": "DeepSpeed's reader only for a DeepSpeed checkpoint: an imported one "
                                      "(`pretrain import-hf`) generates and exports without DeepSpeed",
    "data_pipeline/sample_corpus/__init__.py": "the sample corpus' generator, only when its file is missing",
    "pretrain/train/loop.py": "lm-evaluation-harness is an optional extra: imported only when eval.tasks is set",
}
TORCH_FREE = ["pretrain.cli", "pretrain.config", "pretrain.run.layout", "pretrain.run.resolved", "pretrain.run.paths",
              "pretrain.run.exits", "pretrain.plan.describe", "pretrain.plan.fit", "pretrain.plan.hardware",
              "pretrain.telemetry.metrics", "pretrain.telemetry.tracking", "pretrain.train.signals", "launch.plan",
              "launch.preflight", "pretrain.demo"]


def _room(module: str) -> str:
    """A package's rooms: pretrain's subpackages and root modules; data_pipeline and launch whole."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pretrain" and len(parts) > 1 else parts[0]


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """(room -> rooms it imports at module level, function-level imports of project modules as `file:line name`)."""
    edges: dict[str, set[str]] = {}
    inner: list[str] = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO)
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            room = _room(module)

            def visit(node: ast.AST, in_function: bool) -> None:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        visit(child, True)
                        continue
                    names = ([child.module] if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module
                             else [a.name for a in child.names] if isinstance(child, ast.Import) else None)
                    if names is None:
                        visit(child, in_function)
                        continue
                    ours = [n for n in names if n.split(".")[0] in PACKAGES]
                    if ours and in_function:
                        inner.append(f"{rel}:{child.lineno} {ours[0]}")
                    elif ours:
                        edges.setdefault(room, set()).update(_room(n) for n in ours if _room(n) != room)
            visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return edges, inner


def test_no_import_cycle_between_rooms():
    edges, _ = _imports()

    def path_back(start: str) -> list[str] | None:
        stack = [(start, [start])]
        seen = set()
        while stack:
            here, trail = stack.pop()
            for nxt in edges.get(here, ()):
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None
    cycles = [" -> ".join(c) for room in edges if (c := path_back(room))]
    assert cycles == [], cycles
    assert {"pretrain.checkpoint", "pretrain.run"} <= edges["pretrain.train"]  # the scan sees the imports


def test_project_modules_are_imported_at_the_top_but_for_the_named_on_demand_ones():
    _, inner = _imports()
    unexplained = [i for i in inner if i.split(":")[0] not in ON_DEMAND]
    assert unexplained == [], unexplained
    assert {i.split(":")[0] for i in inner} == set(ON_DEMAND), "an on-demand import named here is gone: drop it"


def test_what_plans_and_dry_runs_read_imports_no_torch():
    code = f"import importlib, sys\nfor m in {TORCH_FREE!r}:\n    importlib.import_module(m)\n" \
           "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'deepspeed', 'megatron'}))"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]
