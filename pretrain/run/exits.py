"""Every exit code of `pretrain`, `python -m launch` and slurm/pretrain.sbatch, defined once.

A code tells whoever started the process what to do next, so each one means one thing everywhere:
the launcher turns its ranks' codes into one for the node (launch/agent.py), and the sbatch script requeues the job
on EXIT_REQUEUE (it spells the number itself, being bash; tests/train/test_exits.py holds the two equal).
"""
from __future__ import annotations

import signal

from data_pipeline.errors import EXIT_BAD_INPUT  # 2, shared with pretrain-data: fix the input named on the one line

EXIT_OK = 0  # done, or nothing left to do
EXIT_NEEDS_PERSON = 3  # too many non-finite steps, or a spike train.spike cannot roll back: a relaunch repeats it
EXIT_LOST_PEER = 4  # another rank died or stopped answering; the other ranks' codes say why
EXIT_SAVE_FAILED = 5  # a checkpoint could not be written (disk full, quota, read-only); the last committed one stands
EXIT_REQUEUE = 42  # stopped by a signal after a committed checkpoint: requeue me, I resume from it
EXIT_HUNG = 43  # no step for train.hang_timeout_s: stacks in <checkpoint.dir>/hangs/; requeue me (bounded), I resume
EXIT_INTERRUPTED = 128 + signal.SIGINT  # a second Ctrl-C: out at once without a checkpoint (the shell's SIGINT code)

__all__ = ["EXIT_BAD_INPUT", "EXIT_HUNG", "EXIT_INTERRUPTED", "EXIT_LOST_PEER", "EXIT_NEEDS_PERSON", "EXIT_OK",
           "EXIT_REQUEUE", "EXIT_SAVE_FAILED"]
