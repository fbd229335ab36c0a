"""One set of source checkpoints, and their resumes on other layouts, for the reader, re-slicing and conversion
tests. Process launches are the cost (each rank imports torch, megatron-core and DeepSpeed for seconds; the tiny
model trains in well under one), so everything is made in three launches, once per session across pytest-xdist
workers (tests/shared.py): whichever worker asks first builds it, the other waits for it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared import built_once  # noqa: E402
from spawn import REPO, child_env, torchrun  # noqa: E402

WORKER = Path(__file__).resolve().parent / "reshard_worker.py"

# Source layouts, written once (6 steps each) by world size. Names say tp/pp/dp, ZeRO stage and dtype.
SOURCES: dict[int, list[dict]] = {
    4: [{"name": "pp2_tp2", "pp": 2, "tp": 2}],
    2: [{"name": "dp2_zero2", "zero": 2}, {"name": "dp2_zero1", "zero": 1}, {"name": "tp2", "tp": 2},
        {"name": "pp2", "pp": 2}, {"name": "dp2_zero1_bf16", "zero": 1, "set": ["train.dtype=bf16"]},
        {"name": "dp2_zero3_bf16", "zero": 3, "set": ["train.dtype=bf16"]},
        # Context parallelism: ZeRO-1 partitions over dp x cp = 2 ranks that each saw half of every sequence.
        {"name": "cp2_zero1", "cp": 2, "zero": 1},
        # A vocabulary that is no multiple of 128 x 2: padded to 512 rows at tp 2, to 384 at tp 1.
        {"name": "tp2_vocab300", "tp": 2, "set": ["model.vocab_size=300"]}],
}
# Resumes of those sources on other layouts: (name, source, target layout, ranks of the target). What each shows
# and its tolerance: test_reshard.py. MOMENTS_RESET is the negative control (Adam's moments zeroed after the load).
RESUMES: list[tuple[str, str, dict, int]] = [
    ("dp2_zero2_to_dp1_zero1", "dp2_zero2", {"zero": 1}, 1),
    ("tp2_to_tp1", "tp2", {"zero": 0}, 1),
    ("tp1_to_tp2", "dp2_zero1", {"tp": 2, "zero": 1}, 2),
    ("pp2_to_pp1", "pp2", {"zero": 0}, 2),
    ("zero1_to_zero3", "dp2_zero1", {"zero": 3}, 2),
    ("pp2tp2_4ranks_to_dp2", "pp2_tp2", {"zero": 2}, 2),
    ("dp2_zero2_to_pp2_zero1", "dp2_zero2", {"pp": 2, "zero": 1}, 2),
    ("bf16_zero3_to_zero1", "dp2_zero3_bf16", {"zero": 1, "set": ["train.dtype=bf16"]}, 2),
    ("cp2_to_cp1", "cp2_zero1", {"zero": 1}, 2),
    ("cp1_to_cp2", "dp2_zero2", {"cp": 2, "zero": 2}, 2),
    ("zero1_to_zero3_moments_reset", "dp2_zero1", {"zero": 3}, 2),
    ("tp2_to_dp2_vocab_padding_512_to_384", "tp2_vocab300", {"zero": 1, "set": ["model.vocab_size=300"]}, 2),
]
MOMENTS_RESET = "zero1_to_zero3_moments_reset"


def _resume_cases(world: int) -> list[dict]:
    return [{"name": n, "source": s, "target": t, **({"reset_moments": True} if n == MOMENTS_RESET else {})}
            for n, s, t, w in RESUMES if w == world]


def _jobs(world: int, out: Path) -> list[str]:
    """Worker arguments for one launch of `world` ranks: its writes, then its resumes (a resume may read a source
    of another world size, so the launches go from the largest world down)."""
    args = []
    for mode, cases in (("write", SOURCES.get(world, [])), ("resume", _resume_cases(world))):
        if cases:
            path = out / f"cases_{mode}_{world}.json"
            path.write_text(json.dumps(cases))
            args += [mode, str(path)]
    return args


def _build(out: Path) -> None:
    """4 ranks: write; 2 ranks: write, then resume; 1 rank: resume, as a plain process (torchrun's parent would
    only add another interpreter start-up; pretrain.run.distributed starts a one-rank world by itself)."""
    for world in (4, 2):
        torchrun(world, [str(WORKER), str(out), *_jobs(world, out)], timeout=900)
    p = subprocess.run([sys.executable, str(WORKER), str(out), *_jobs(1, out)], cwd=REPO, env=child_env(),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"one-rank resume exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-8000:]}"


def _results(out: Path, mode: str) -> dict:
    results: dict = {}
    for path in sorted(out.glob(f"results_{mode}_*.json")):
        results.update(json.loads(path.read_text()))
    return results


@pytest.fixture(scope="session")
def reshard_dir(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "reshard", _build)


@pytest.fixture(scope="session")
def sources(reshard_dir) -> tuple[Path, dict]:
    """(directory holding <name>/step_6 and <name>.oracle.pt, per-case results of the writes)."""
    return reshard_dir, _results(reshard_dir, "write")


@pytest.fixture(scope="session")
def resumed(reshard_dir) -> dict:
    """Per-case results of the resumes (reshard_worker.resume), by case name."""
    return _results(reshard_dir, "resume")
