"""Where a launch of `pretrain train` starts from, and getting there.

Four cases, decided on every rank alike before the engine is built (a bad checkpoint fails before minutes of
set-up): nothing (a fresh run); `model.init_from` (weights only, step 0); a checkpoint written with this run's
layout (DeepSpeed's own per-rank files load as they are, bit-exact); a checkpoint of another layout (tp/pp/dp,
ZeRO stage, dtype or vocabulary padding): the engine is built from its fp32 master weights, Adam's moments and
step are re-sliced into it (pretrain/checkpoint/reshard.py), and the data loader re-splits the samples every old
DP rank had not yet consumed over the new ranks (data_pipeline.loader.TokenLoader.load_state_dict).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pretrain import checkpoint
from pretrain.checkpoint.reader import CheckpointReader
from pretrain.checkpoint.reshard import check_same_model, needs_reslicing
from pretrain.checkpoint.weights import init_source
from pretrain.config import Config
from pretrain.console import say
from pretrain.run.distributed import DistEnv
from pretrain.run.layout import Layout
from pretrain.run.resolved import ResolvedRun, layout_words


@dataclass(frozen=True)
class StartPoint:
    checkpoint: Path | None       # the step dir to resume from
    saved: ResolvedRun | None     # the run that wrote it, when its layout differs from this one's
    init: Any                     # weights the engine is built from (pretrain.checkpoint.weights.WeightSource), or None

    def describe(self, init_from: str | None) -> str:
        if self.checkpoint is not None:
            return f"resuming from {self.checkpoint}"
        return f"starting from {init_from} (weights only)" if self.init is not None else "starting fresh"


def choose_start(cfg: Config, run: ResolvedRun, env: DistEnv) -> StartPoint:
    """Collective (checkpoint.choose agrees across ranks). Rank 0 says what will be re-sliced."""

    chosen = checkpoint.choose(Path(cfg.checkpoint.dir), cfg.checkpoint.resume, env)
    if chosen is None:
        return StartPoint(None, None, init_source(cfg, run) if cfg.model.init_from else None)
    check_tokenizer(chosen, run, cfg.model.init_from_any_tokenizer)
    saved = saved_run(chosen, run)
    if saved is None:
        return StartPoint(chosen, None, None)
    if env.rank == 0:
        say(f"checkpoint {chosen.name} was written with {layout_words(saved)}; re-slicing weights and optimizer "
            f"state for {layout_words(run)}")
    return StartPoint(chosen, saved, CheckpointReader(chosen, verified=True))  # choose() hashed it


class EngineFiles(Protocol):
    """The engine as checkpoints see it (pretrain.train.engine.Engine): its files saved and loaded, its step."""
    global_step: int

    def save(self, step_dir: Path) -> None: ...
    def load(self, step_dir: Path) -> Any: ...
    def load_resliced(self, init: Any) -> Any: ...


class Stateful(Protocol):
    """A loader's resumable position (data_pipeline.loader.TokenLoader)."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def restore(start: StartPoint, env: DistEnv, engine: EngineFiles, loader: Stateful) -> checkpoint.Loaded | None:
    """Load the chosen checkpoint into the built engine and loader; what it held (step, meta, this rank's state),
    or None when there is none to load."""
    if start.checkpoint is None:
        return None
    if start.saved is None:
        loaded = checkpoint.load(start.checkpoint, env, load_model=engine.load)
        loader.load_state_dict(loaded.rank_state["loader"])
    else:
        loaded = checkpoint.load(start.checkpoint, env, load_model=lambda _: engine.load_resliced(start.init),
                                 saved_rank=start.saved.layout.stream_rank(env.dp_rank))
        loader.load_state_dict(old_loader_states(start.checkpoint, start.saved.layout))
    if engine.global_step != loaded.step:  # the schedule runs on the engine's count, the loop on meta.json's
        raise checkpoint.CheckpointError(f"{start.checkpoint}: DeepSpeed's files are at step {engine.global_step}, "
                                         f"{checkpoint.META} says {loaded.step}")
    return loaded


def check_tokenizer(step_dir: Path, run: ResolvedRun, any_tokenizer: bool) -> None:
    """A resume goes on with the shards at data.path: they must be made with the tokenizer the checkpoint was
    trained with (the identity hash in meta.json), else every token id would mean another word than the embedding
    learned; `model.init_from_any_tokenizer` is the one explicit opt-in, as for `model.init_from`."""
    meta = checkpoint.read_meta(step_dir)
    theirs = meta.tokenizer.get("identity") or (meta.resolved.get("tokenizer") or {}).get("identity")
    ours = run.tokenizer.identity if run.tokenizer else None
    if theirs and ours and theirs != ours and not any_tokenizer:
        raise checkpoint.CheckpointError(
            f"{step_dir / checkpoint.META}: field tokenizer.identity {theirs[:12]} is not the tokenizer the shards "
            f"at data.path were made with ({ours[:12]}): resume with shards made by "
            f"{step_dir / checkpoint.TOKENIZER_DIR}, or set model.init_from_any_tokenizer=true to train on with them")


def saved_run(step_dir: Path, run: ResolvedRun) -> ResolvedRun | None:
    """The run that wrote `step_dir` when its layout (tp/pp/dp, ZeRO stage, dtype, vocabulary padding) differs
    from this one's, so that DeepSpeed's own per-rank files cannot be loaded as they are; None when they can.
    A checkpoint of another model (not only another layout) is refused here, in one line, before the engine is
    built from it (building would otherwise fail first, with a shape traceback)."""

    try:
        saved = checkpoint.run_of(step_dir)
    except checkpoint.CheckpointError:  # written before runs were recorded: only its own layout can load it
        old = checkpoint.read_meta(step_dir).layout
        if old and any(old.get(k, 1) != getattr(run.layout, k) for k in ("tp", "pp", "dp", "cp")):  # older: cp 1
            raise checkpoint.CheckpointError(
                f"{step_dir} was written by an older version (no resolved run in meta.json) with tp {old.get('tp')} "
                f"x pp {old.get('pp')} x dp {old.get('dp')}; it can resume only on that layout, not on "
                f"{run.layout.shape_text}") from None
        return None
    check_same_model(saved.model, run.model, step_dir)
    return saved if needs_reslicing(saved, run) else None


def old_loader_states(step_dir: Path, saved: Layout) -> list[dict]:
    """Every old DP rank's loader state (from one of its ranks' files): with them the loader continues this DP
    rank's stream exactly when the DP size is the same, or re-splits the samples not yet consumed exactly over the
    new ranks when it changed."""
    return [checkpoint.read_rank_file(step_dir / checkpoint.rank_file(saved.stream_rank(d)))["loader"]
            for d in range(saved.dp)]
