"""The launcher's derivation: SLURM environment -> torchrun arguments, and the checks made before any rendezvous.

Real environment dicts as `srun --ntasks-per-node=1` sets them (copied from a 2-node job on the local cluster);
no cluster needed. The hostlist expander is the pure parser so the test does not depend on scontrol.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.agent import exit_code_of_failures
from launch.nodelist import parse_hostlist
from launch.plan import LaunchError, LaunchPlan, master_port_for, plan_from_env
from launch.preflight import check_world, config_args
from slurm_helpers import REPO, child_env

# Node 1 of job 4242 on 2 nodes, as srun sets it for one task per node.
SRUN_NODE1 = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_NODEID": "1",
    "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "2", "SLURM_CPUS_PER_TASK": "32",
}


def plan(env: dict[str, str], nproc: int = 8) -> LaunchPlan:
    return plan_from_env(env, nproc, expand=parse_hostlist)


def test_srun_task_becomes_a_static_rendezvous_at_the_first_node() -> None:
    p = plan(SRUN_NODE1)
    assert (p.nnodes, p.node_rank, p.master_addr, p.master_port, p.world_size) == (2, 1, "gpu07", 24242, 16)
    assert p.torchrun_args(["-m", "pretrain", "train", "--config", "c.yaml"]) == [
        "--nnodes", "2", "--node-rank", "1", "--master-addr", "gpu07", "--master-port", "24242",
        "--rdzv-backend", "static", "--nproc-per-node", "8", "--max-restarts", "0",
        "-m", "launch.rank", "-m", "pretrain", "train", "--config", "c.yaml"]
    # 32 CPUs for 8 ranks; fault handler and NCCL async error handling on.
    assert p.env == {"OMP_NUM_THREADS": "4", "PYTHONFAULTHANDLER": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def test_every_node_agrees_on_master_and_port_and_only_the_rank_differs() -> None:
    node0 = plan({**SRUN_NODE1, "SLURM_NODEID": "0", "SLURM_PROCID": "0"})
    node1 = plan(SRUN_NODE1)
    assert (node0.master_addr, node0.master_port) == (node1.master_addr, node1.master_port)
    assert (node0.node_rank, node1.node_rank) == (0, 1)
    assert master_port_for("4242") == master_port_for("4242") != master_port_for("4243")
    assert 20000 <= master_port_for("99999999") < 40000


def test_user_settings_win_over_launcher_defaults() -> None:
    p = plan({**SRUN_NODE1, "OMP_NUM_THREADS": "2", "PYTHONFAULTHANDLER": "0"})
    assert p.env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert plan_from_env(SRUN_NODE1, 8, expand=parse_hostlist, master_port=29500).master_port == 29500


def test_without_slurm_the_run_is_standalone() -> None:
    p = plan({}, nproc=2)
    assert p.standalone and p.world_size == 2
    assert p.torchrun_args(["train.py"])[:5] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "2"]


@pytest.mark.parametrize("env, message", [
    ({k: v for k, v in SRUN_NODE1.items() if not k.startswith("SLURM_STEP")}, "not a job step"),
    ({**SRUN_NODE1, "SLURM_STEP_NUM_TASKS": "16"}, "16 tasks on 2 nodes"),
    ({**SRUN_NODE1, "SLURM_STEP_NODELIST": "gpu07"}, "expands to 1 hosts"),
    ({**SRUN_NODE1, "SLURM_NODEID": "2"}, "outside 0..1"),
    ({**SRUN_NODE1, "SLURM_NNODES": "two", "SLURM_STEP_NUM_NODES": "two"}, "not an integer"),
])
def test_an_environment_that_cannot_work_is_refused_with_the_reason(env: dict[str, str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        plan(env)


def test_hostlist_parser() -> None:
    assert parse_hostlist("gpu[007-009,012],login1") == ["gpu007", "gpu008", "gpu009", "gpu012", "login1"]
    assert parse_hostlist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    with pytest.raises(ValueError, match="bad hostlist range"):
        parse_hostlist("gpu[a-b]")


def test_config_and_overrides_are_found_in_the_training_command() -> None:
    assert config_args(["-m", "pretrain", "train", "--config", "c.yaml", "--set", "parallel.tp=2",
                        "--set=parallel.pp=2"]) == ("c.yaml", ["parallel.tp=2", "parallel.pp=2"])
    assert config_args(["train.py", "--config=x.yaml"]) == ("x.yaml", [])


def test_world_size_check_names_both_numbers(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("parallel:\n  tp: 2\n  pp: 2\n")
    p = plan(SRUN_NODE1, nproc=3)  # 2 nodes x 3 = 6, tp x pp = 4
    with pytest.raises(LaunchError) as err:
        check_world(p, ["-m", "pretrain", "train", "--config", str(cfg)])
    assert "world size 6 is not divisible by tp x pp = 2 x 2" in str(err.value)
    assert "the allocation gives world size 6 (2 nodes x 3 per node)" in str(err.value)
    check_world(p, ["-m", "pretrain", "train", "--config", str(cfg), "--set", "parallel.pp=1"])  # 6 % 2 == 0: fine
    with pytest.raises(LaunchError, match="model.n_heads=4 is not divisible by parallel.tp=3"):
        check_world(p, ["train.py", "--config", str(cfg), "--set", "parallel.pp=1", "--set", "parallel.tp=3"])
    with pytest.raises(LaunchError, match=r"--expect-world 8 but the allocation gives world size 6"):
        check_world(p, ["train.py"], expect_world=8)
    with pytest.raises(LaunchError, match="unknown key 'parallel.tq'"):  # a bad config is named, not a traceback
        check_world(p, ["train.py", "--config", str(cfg), "--set", "parallel.tq=2"])


def test_one_exit_code_per_node_from_the_ranks_codes() -> None:
    assert exit_code_of_failures([42, 42]) == 42  # every rank checkpointed and asked for a requeue
    assert exit_code_of_failures([42, 1]) == 1  # anything mixed is a plain failure: never requeue a crash
    assert exit_code_of_failures([-9]) == 137  # killed by SIGKILL, shell convention
    # torchrun SIGTERMs the other ranks as soon as one exits; one already shutting down after its checkpoint dies
    # of it. That is the agent's cleanup, not the run's outcome.
    assert exit_code_of_failures([42, -15]) == 42
    assert exit_code_of_failures([-15]) == 143 and exit_code_of_failures([1, -15]) == 1
    # 4 says "another rank died": the other ranks' code is the cause (a second Ctrl-C, 130; a crash, 1)
    assert exit_code_of_failures([4, 130]) == 130 and exit_code_of_failures([1, 4]) == 1
    assert exit_code_of_failures([4, 4]) == 4


def test_cli_fails_fast_with_one_line_and_no_rendezvous() -> None:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "launch", "--nproc-per-node", "2", "--expect-world", "4", "--",
                           "train.py"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "launch: error: --expect-world 4 but the allocation gives world size 2 (1 node x 2 per node)"]
    assert proc.stdout == "" and time.monotonic() - started < 60
