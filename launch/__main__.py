"""`python -m launch [--nproc-per-node N] [--expect-world W] [--dry-run] [--verbose] -- <training command>`.

Under `srun --ntasks-per-node=1` (one launcher per node) it derives the node rank, node count, master address
and port from SLURM and runs torchrun's agent with a static rendezvous; outside SLURM it runs a standalone
single-node torchrun. The training command is what torchrun takes after its own options, e.g.
`-m pretrain train --config configs/debug.yaml` or `path/to/script.py --flag`.

Signals: SIGUSR1 (a preemption notice), SIGTERM (a stop request: `kill`, a container runtime, `scancel
--signal=TERM`) and SIGINT (Ctrl-C) are forwarded to the ranks, which checkpoint and exit 42; the launcher exits
with the ranks' code. A second Ctrl-C makes the ranks exit at once (130). Plain `torchrun` does none of this: it
kills the ranks on SIGTERM and Ctrl-C and dies of SIGUSR1, orphaning them.
"""
from __future__ import annotations

import signal

# First thing, before the slow imports: a preemption notice (SIGUSR1), a stop request (SIGTERM) or a Ctrl-C (SIGINT)
# that arrives now must stay pending for the ranks, not kill the launcher (launch/agent.py explains the signal path).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM, signal.SIGINT})

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from launch.agent import run_torchrun  # noqa: E402
from launch.plan import LaunchError, default_nproc_per_node, plan_from_env
from launch.preflight import check_world


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="ranks per node (default: number of visible GPUs, or 1 on CPU)")
    parser.add_argument("--expect-world", type=int, default=None,
                        help="fail fast unless nodes x nproc-per-node equals this")
    parser.add_argument("--master-port", type=int, default=None,
                        help="override the port derived from the SLURM job id")
    parser.add_argument("--dry-run", action="store_true", help="print the launch line and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="keep torchrun's own log lines (each rank's start and exit); by default the launcher "
                             "prints one line per node")
    args = parser.parse_args(argv[:split])  # --help works without a command
    command = argv[split + 1:]
    if not command:
        raise LaunchError("usage: python -m launch [options] -- <training command>; no command after `--`")
    return args, command


def main(argv: list[str] | None = None) -> int:
    try:
        args, command = parse_args(sys.argv[1:] if argv is None else argv)
        nproc = args.nproc_per_node if args.nproc_per_node is not None else default_nproc_per_node()
        plan = plan_from_env(os.environ, nproc, master_port=args.master_port)
        check_world(plan, command, args.expect_world)
    except LaunchError as e:
        print(f"launch: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"launch[node {plan.node_rank}/{plan.nnodes}]: {plan.describe(command, sys.executable)}", flush=True)
    if args.dry_run:
        return 0
    os.environ.update(plan.env)
    code = run_torchrun(plan.torchrun_args(command), verbose=args.verbose)
    # The ranks are gone and `code` is the node's verdict; the forwarded signals stay blocked to the end.
    return code


if __name__ == "__main__":
    from pretrain.libraries import exit_now

    exit_now(main())  # without the interpreter's teardown of torch (pretrain/libraries.py)
