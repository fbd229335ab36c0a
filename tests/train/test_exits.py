"""Every exit code is defined once (pretrain/run/exits.py), and the sbatch script requeues on the same number."""
from __future__ import annotations

import re

from spawn import REPO

from pretrain.run import exits

DEFINITION = re.compile(r"^\s*(EXIT_\w+|\w+_EXIT_CODE)\s*=\s*\d", re.MULTILINE)
# 2 belongs to pretrain-data too, which imports no pretrain
HOMES = {"pretrain/run/exits.py", "data_pipeline/errors.py"}


def test_no_module_but_exits_defines_an_exit_code():
    found = {str(p.relative_to(REPO)) for package in ("pretrain", "launch", "data_pipeline")
             for p in (REPO / package).rglob("*.py") if DEFINITION.search(p.read_text(encoding="utf-8"))}
    assert found == HOMES, f"exit codes defined outside {sorted(HOMES)}: {sorted(found - HOMES)}"


def test_the_codes_are_distinct_and_the_sbatch_script_requeues_on_exit_requeue():
    codes = {name: getattr(exits, name) for name in exits.__all__}
    assert len(set(codes.values())) == len(codes), codes
    sbatch = (REPO / "slurm" / "pretrain.sbatch").read_text()
    (value,) = re.findall(r"^REQUEUE_EXIT_CODE=(\d+)", sbatch, re.MULTILINE)
    assert int(value) == exits.EXIT_REQUEUE
    (value,) = re.findall(r"^HUNG_EXIT_CODE=(\d+)", sbatch, re.MULTILINE)
    assert int(value) == exits.EXIT_HUNG
