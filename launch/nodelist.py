"""SLURM hostlist expressions (`gpu[001-004,010],login1`) -> host names, in SLURM's order.

`scontrol show hostnames` is the authority and is used when it is on PATH (it knows every corner of the
syntax); the small parser below covers the forms SLURM actually emits (comma lists, bracketed ranges with
zero padding, several bracket groups) so the launcher still works on a login node without the client tools and
unit tests need no cluster.
"""
from __future__ import annotations

import itertools
import re
import shutil
import subprocess

_GROUP = re.compile(r"\[([^\]]*)\]")


def _split_top_level(expr: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(expr[start:i])
            start = i + 1
    parts.append(expr[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_ranges(body: str, expr: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad hostlist range {item!r} in {expr!r}")
        if not sep:
            out.append(lo)
            continue
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def parse_hostlist(expr: str) -> list[str]:
    """Expand a hostlist expression without SLURM's tools."""
    hosts: list[str] = []
    for part in _split_top_level(expr):
        pieces = _GROUP.split(part)  # [text, group, text, group, ..., text]
        choices = [[pieces[i]] if i % 2 == 0 else _expand_ranges(pieces[i], expr) for i in range(len(pieces))]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def expand_hostlist(expr: str) -> list[str]:
    """Host names of a SLURM nodelist: `scontrol show hostnames` when available, else `parse_hostlist`."""
    if shutil.which("scontrol"):
        proc = subprocess.run(["scontrol", "show", "hostnames", expr], capture_output=True, text=True, timeout=30)
        if proc.returncode == 0 and proc.stdout.split():
            return proc.stdout.split()
    return parse_hostlist(expr)
