"""`eval.tasks` every `eval.every` steps: lm-eval on the training ranks with the live weights.

No copy of the model and no extra process: each data-parallel replica's leader runs lm-eval against the training
engine (pretrain/eval/lm.py) while the replica's other ranks follow its forwards (pretrain/eval/replica.py).
Tasks are checked when the run starts (names known, lm-eval installed), not at the first eval hours later.
The scores go to metrics.jsonl and MLflow at that step as "eval/<task>/<metric>", with `time_share`: the
evaluations' seconds so far as a share of this launch's wall time.
"""
from __future__ import annotations

import time
from typing import Any

from data_pipeline.tokenizer import load_tokenizer
from pretrain.config import Config, ConfigError
from pretrain.eval.lm import PretrainLM
from pretrain.eval.replica import Replica
from pretrain.eval.results import flat_scores
from pretrain.eval.tasks import check_tasks
from pretrain.run.distributed import DistEnv
from pretrain.run.resolved import ResolvedRun
from pretrain.train.engine import Engine


class DownstreamEval:
    def __init__(self, cfg: Config, run: ResolvedRun, env: DistEnv, engine: Engine) -> None:
        self.cfg, self.env = cfg.eval, env
        self.task_manager = check_tasks(self.cfg.tasks, self.cfg.include_path)
        if run.tokenizer is None or not run.tokenizer.path:
            raise ConfigError("eval.tasks needs the tokenizer's files (data.tokenizer, or the path the shards' "
                             "manifest records)")
        self.tokenizer = load_tokenizer(run.tokenizer.path)
        self.replica = Replica(engine, env)
        self.max_length = run.model.max_seq_len
        self.seconds = 0.0
        self.started = time.perf_counter()

    def run(self) -> dict[str, float] | None:
        """Collective. Rank 0 gets the scores; the other ranks None."""
        t0 = time.perf_counter()
        results: dict[str, Any] | None = None
        if self.replica.leader:
            try:
                import lm_eval

                lm = PretrainLM(self.replica, self.tokenizer, self.max_length, batch_size=self.cfg.batch_size)
                limit = self.cfg.limit
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=list(self.cfg.tasks), num_fewshot=self.cfg.num_fewshot,
                    limit=int(limit) if limit is not None and limit >= 1 else limit,
                    task_manager=self.task_manager, verbosity="ERROR", log_samples=False,
                    # the run's own random streams stay untouched (exact resume); few-shot sampling keeps its seed
                    random_seed=None, numpy_random_seed=None, torch_random_seed=None)
            finally:
                self.replica.close()
        else:
            self.replica.serve()
        self.seconds += time.perf_counter() - t0
        if self.env.rank != 0 or results is None:
            return None
        scores = flat_scores(results)
        scores["time_share"] = self.seconds / max(time.perf_counter() - self.started, 1e-9)
        return scores
