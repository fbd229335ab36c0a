"""This rank's batches: the training stream and the held-out set, as the resolved run describes them."""
from __future__ import annotations

from typing import Any

from data_pipeline.loader import TokenLoader
from pretrain.config import Config
from pretrain.run.distributed import DistEnv
from pretrain.run.resolved import ResolvedRun
from pretrain.train.engine import Engine


def make_loader(cfg: Config, run: ResolvedRun, env: DistEnv, *, validation: bool = False) -> TokenLoader:
    """This rank's data: TP and PP peers of one DP group read the same stream. The sources are the resolved ones
    (local paths absolute). Validation reads data.val_path in its sources' own token proportions: data.weights
    is the training mixture, one weight per entry of data.path, and means nothing for the held-out shards."""
    facts, weights = (run.val_data, None) if validation else (run.train_data, cfg.data.weights)
    return TokenLoader(list(facts.sources), seq_len=run.seq_len, batch_size=cfg.train.micro_batch_size,
                       dp_rank=env.dp_rank, dp_size=env.dp_size, num_workers=cfg.data.num_workers,
                       seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer, weights=weights,
                       document_mask=cfg.model.document_mask, reshard=cfg.data.reshard)


class HeldOut:
    """The validation set: the first `train.eval_steps` micro-batches of the held-out shards, the same ones for
    every eval. They are read once, at the first eval, and kept (eval_steps x micro_batch x (seq_len + 1) tokens:
    kilobytes to a few MB), so an eval neither re-reads manifests nor restarts loader workers. The shards were
    checked at start (`resolve_run`: they exist, share the training tokenizer, suffice for every DP rank x
    worker)."""

    def __init__(self, cfg: Config, run: ResolvedRun, env: DistEnv) -> None:
        self.steps = cfg.train.eval_steps
        self.loader = make_loader(cfg, run, env, validation=True) if run.val_data is not None else None
        self.batches: list[Any] | None = None

    def evaluate(self, engine: Engine) -> float | None:
        """Mean loss over the held-out micro-batches (collective: every rank calls it at the same step)."""
        if self.batches is None:
            if self.loader is None:  # no data.val_path
                return None
            stream = iter(self.loader)
            self.batches = [next(stream) for _ in range(self.steps)]
            stream.close()  # stops the loader's workers now
            self.loader = None
        batches = iter(self.batches)
        return sum(engine.eval_step(batches) for _ in range(self.steps)) / self.steps
