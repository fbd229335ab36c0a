"""This rank's batches: the training stream and the held-out set, as the resolved run describes them."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from data_pipeline.loader import TokenLoader
from data_pipeline.tokenizer import load_tokenizer, token_byte_lengths
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


@dataclass(frozen=True)
class HeldOutScore:
    loss: float  # mean next-token loss (nats) over every held-out target
    bpb: float | None  # bits per byte of the text those targets spell; None without the tokenizer's files


class HeldOut:
    """The validation set: the first `train.eval_steps` micro-batches of the held-out shards, the same ones for
    every eval. They are read once, at the first eval, and kept (eval_steps x micro_batch x (seq_len + 1) tokens:
    kilobytes to a few MB), so an eval neither re-reads manifests nor restarts loader workers. The shards were
    checked at start (`resolve_run`: they exist, share the training tokenizer, suffice for every DP rank x
    worker).

    Besides the loss, bits per byte: the same losses summed over targets that stand for text (special tokens
    such as eos excluded) and divided by ln 2 times the UTF-8 bytes those targets spell (nanochat's measure). A
    loss per token depends on how much text a token holds; per byte it does not, so runs with different
    tokenizers compare."""

    def __init__(self, cfg: Config, run: ResolvedRun, env: DistEnv) -> None:
        self.steps = cfg.train.eval_steps
        self.env = env
        self.loader = make_loader(cfg, run, env, validation=True) if run.val_data is not None else None
        self.batches: list[Any] | None = None
        path = run.tokenizer.path if run.tokenizer else ""
        self.token_bytes = (torch.from_numpy(token_byte_lengths(load_tokenizer(path)))
                            if self.loader is not None and path and os.path.exists(path) else None)

    def evaluate(self, engine: Engine) -> HeldOutScore | None:
        """Collective: every rank calls it at the same step."""
        if self.batches is None:
            if self.loader is None:  # no data.val_path
                return None
            stream = iter(self.loader)
            self.batches = [next(stream) for _ in range(self.steps)]
            stream.close()  # stops the loader's workers now
            self.loader = None
        nats = targets_n = text_nats = text_bytes = 0.0
        for batch in self.batches:
            inputs, targets, docs = engine.split(batch)
            nll = -engine.score(inputs, targets, docs)[..., 0].double().cpu()  # (B, T)
            nats, targets_n = nats + float(nll.sum()), targets_n + nll.numel()
            if self.token_bytes is not None:
                spelled = self.token_bytes[targets.cpu().clamp(max=len(self.token_bytes) - 1)]
                text_nats += float((nll * (spelled > 0)).sum())
                text_bytes += float(spelled.sum())
        # TP and PP peers hold the same sums: the factor they add cancels in each ratio.
        sums = torch.tensor([nats, targets_n, text_nats, text_bytes], dtype=torch.float64)
        nats, targets_n, text_nats, text_bytes = self.env.sums_of(sums)
        bpb = text_nats / (math.log(2) * text_bytes) if text_bytes > 0 else None
        return HeldOutScore(loss=nats / targets_n, bpb=bpb)
