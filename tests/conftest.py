"""Shared test plumbing: the GPU marker and the interpreter cases. Process-launch helpers live in tests/spawn.py."""
from __future__ import annotations

import os

import pytest
import torch

from pretrain.libraries import lighten_imports

# Where CUDA is absent, the Triton kernel tests run the kernels in Triton's interpreter on CPU. The variable is read
# when a kernel is decorated, i.e. when pretrain.kernels.triton_* is first imported: set it before any test runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# As every `pretrain` process does: DeepSpeed's compiled CPU op cached in this environment (so ranks, CLIs and
# in-process engines of this checkout never rebuild it for another checkout's), and its imports light.
lighten_imports()


@pytest.fixture(autouse=True)
def _cpu_children(request, monkeypatch):
    """A test not marked `gpu` means CPU: every process it starts (ranks, CLIs, benchmarks, SLURM jobs) sees no CUDA
    device, so on a GPU host it trains on gloo/CPU exactly as it does here, instead of calling set_device(1) on a
    one-GPU machine or running fused kernels against CPU-recorded expectations. In-process code is unaffected
    (CUDA is already initialised): tests that build models in-process put their tensors on CPU themselves."""
    if "gpu" not in request.node.keywords:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def pytest_collection_modifyitems(config, items):
    """Without CUDA: skip the `gpu` tests. With CUDA: skip the Triton-interpreter cases (ids `cpu-*-interpreter`):
    Triton picks the interpreter or the GPU compiler when a kernel module is imported (TRITON_INTERPRET above),
    so in a CUDA process those kernels are compiled and cannot take CPU tensors; the `gpu` cases check the same
    arithmetic there."""
    if torch.cuda.is_available():
        skip = pytest.mark.skip(reason="Triton interpreter case: kernels are compiled for the GPU in this process")
        marked = [item for item in items if "interpreter" in item.name]
    else:
        skip = pytest.mark.skip(reason="needs CUDA")
        marked = [item for item in items if "gpu" in item.keywords]
    for item in marked:
        item.add_marker(skip)
    cache = getattr(config, "cache", None)  # absent under `-p no:cacheprovider`
    _longest_first(items, cache.get(MODULE_SECONDS, {}) if cache else {})


# Seconds each test module took in the last run that ran it (setup, call and teardown of its tests), kept in
# pytest's cache (.pytest_cache) by the controlling process; a fresh clone has none and orders by kind alone.
MODULE_SECONDS = "pretrain/module-seconds"
_took: dict[str, float] = {}


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _longest_first(items, seconds: dict[str, float]) -> None:
    """Modules ordered longest first: the SLURM cluster's, then those that launch training, then unit tests, and
    within each kind by the seconds they took last time, so under `make test` the workers finish together instead of
    one running a long scenario alone at the end. Each module's tests stay contiguous and in their own order."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(_module(item.nodeid), []).append(item)

    def weight(module: str) -> tuple[int, float]:
        group = modules[module]
        if any("slurm" in item.keywords for item in group):
            kind = 0
        else:
            kind = 1 if any("slow" in item.keywords or "distributed" in item.keywords for item in group) else 2
        return kind, -seconds.get(module, 0.0)
    items[:] = [item for module in sorted(modules, key=weight) for item in modules[module]]


def pytest_runtest_logreport(report) -> None:
    """Every phase's duration, by module (under xdist the controller receives its workers' reports here too)."""
    module = _module(report.nodeid)
    _took[module] = _took.get(module, 0.0) + report.duration


def pytest_sessionfinish(session) -> None:
    """The controller (or the only process) stores this run's module seconds over the last run's."""
    cache = getattr(session.config, "cache", None)
    if cache is None or hasattr(session.config, "workerinput") or not _took:
        return
    cache.set(MODULE_SECONDS, {**cache.get(MODULE_SECONDS, {}), **{m: round(s, 1) for m, s in _took.items()}})


def pytest_xdist_make_scheduler(config, log):
    """`make test` (`-n 3 --dist loadscope`): one work unit per test module, so a module fixture (a trained run, the
    parity table) is built once, on one worker; every module under tests/slurm is one unit, as they share one local
    cluster. (pytest-xdist's own `xdist_group` marks take effect by rewriting `item._nodeid`, which pytest 9 no
    longer reads, so the units are named by path here.) Products that modules of different units read are built
    once per session by tests/shared.py."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            return "tests/slurm" if module.startswith("tests/slurm/") else module

    return ByModule(config, log)
