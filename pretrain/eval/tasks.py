"""lm-eval task names checked the way a user needs: an unknown one is one line with the closest known names."""
from __future__ import annotations

import difflib
from typing import Any

from pretrain.config import ConfigError


def task_manager(include_path: str | None, tasks: list[str] | None = None) -> Any:
    """lm-eval's TaskManager. Indexing lm-eval's own ~15k task files takes seconds, so when every task asked for
    is found under `include_path` alone, the built-in ones are not indexed."""
    from lm_eval.tasks import TaskManager

    return local_task_manager(include_path, tasks) or TaskManager(include_path=include_path)


def local_task_manager(include_path: str | None, tasks: list[str] | None) -> Any:
    """A TaskManager of `include_path`'s files alone (milliseconds) when every task asked for is among them, else
    None."""
    if not include_path or not tasks:
        return None
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False)
    return local if all(local.match_tasks([t]) for t in tasks) else None


def unknown_tasks_line(missing: list[str], manager: Any) -> str:
    known = manager.all_tasks
    parts = []
    for name in missing:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        parts.append(f"'{name}' (closest: {', '.join(close)})" if close else f"'{name}'")
    return (f"unknown lm-eval task {'; '.join(parts)}; `lm-eval ls tasks` lists them, and --include_path (or "
            "eval.include_path) adds a directory of your own task YAML files")


def check_tasks(tasks: list[str], include_path: str | None) -> Any:
    """The TaskManager for `tasks`, or ConfigError naming each unknown task and its closest known names."""
    try:
        manager = task_manager(include_path, tasks)
    except ImportError:
        raise ConfigError("eval.tasks needs lm-evaluation-harness: pip install 'llama-pretrain[eval]'") from None
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise ConfigError(unknown_tasks_line(missing, manager))
    return manager
