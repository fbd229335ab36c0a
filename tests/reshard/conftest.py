"""One set of source checkpoints for the reader and the re-slicing tests (torchrun launches are the cost)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spawn import torchrun  # noqa: E402

WORKER = Path(__file__).resolve().parent / "reshard_worker.py"

# Source layouts, written once (6 steps each) by world size. Names say tp/pp/dp, ZeRO stage and dtype.
SOURCES: dict[int, list[dict]] = {
    4: [{"name": "pp2_tp2", "pp": 2, "tp": 2}],
    2: [{"name": "dp2_zero2", "zero": 2}, {"name": "dp2_zero1", "zero": 1}, {"name": "tp2", "tp": 2},
        {"name": "pp2", "pp": 2}, {"name": "dp2_zero1_bf16", "zero": 1, "set": ["train.dtype=bf16"]},
        {"name": "dp2_zero3_bf16", "zero": 3, "set": ["train.dtype=bf16"]},
        # A vocabulary that is no multiple of 128 x 2: padded to 512 rows at tp 2, to 384 at tp 1.
        {"name": "tp2_vocab300", "tp": 2, "set": ["model.vocab_size=300"]}],
}


def launch(mode: str, world: int, cases: list[dict], out: Path) -> dict:
    path = out / f"cases_{mode}_{world}.json"
    path.write_text(json.dumps(cases))
    torchrun(world, [str(WORKER), mode, str(path), str(out)], timeout=900)
    return json.loads((out / f"results_{mode}_{world}.json").read_text())


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> tuple[Path, dict]:
    """(directory holding <name>/step_6 and <name>.oracle.pt, per-case results)."""
    out = tmp_path_factory.mktemp("reshard")
    results: dict = {}
    for world, cases in SOURCES.items():
        results.update(launch("write", world, cases, out))
    return out, results
