"""Shared by the parity test (pytest process) and its torchrun worker: the tiny model, the data, the reference.

Every layout trains on the same global batch per step (8 sequences): DP=2 layouts take micro 2 x accum 2 per
rank, DP=1 layouts (TP=2, PP=2) micro 2 x accum 4. Sequences are drawn from a generator seeded by step, and rank
r's micro-batch m is rows [(r * accum + m) * micro, ...) of that step's global batch.
"""
from __future__ import annotations

from typing import Iterator

import torch

from pretrain import kernels
from pretrain.config import load_config
from pretrain.run.layout import Layout
from pretrain.model import Transformer, init_model
from pretrain.parallel.optimizer import param_groups
from pretrain.train.schedule import lr_at

STEPS = 5
VOCAB = 256  # a multiple of 128 x 2, so the padded vocabulary is the same for tp = 1 and 2
SEQ = 16
GLOBAL_BATCH = 8
MICRO = 2
BASE = ["model.flavor=debug", "model.n_layers=2", f"model.vocab_size={VOCAB}", f"train.seq_len={SEQ}",
        f"train.micro_batch_size={MICRO}", f"train.max_steps={STEPS + 3}", "train.seed=7", "optim.lr=0.01",
        "optim.warmup_steps=2", "optim.grad_clip=1.0", "optim.weight_decay=0.1", "train.device=cpu",
        # The loss head in chunks of 12 tokens: a micro-batch's 32 make two whole chunks and a ragged one.
        "model.loss_chunk_tokens=12"]


def case_config(case: dict) -> list[str]:
    dp = case.get("world", 2) // (case.get("tp", 1) * case.get("pp", 1) * case.get("cp", 1))
    accum = GLOBAL_BATCH // (MICRO * dp)
    return BASE + [f"train.grad_accum={accum}", f"parallel.tp={case.get('tp', 1)}",
                   f"parallel.pp={case.get('pp', 1)}", f"parallel.cp={case.get('cp', 1)}",
                   f"parallel.zero_stage={case.get('zero', 0)}",
                   *case.get("set", [])]


def global_batch(step: int) -> torch.Tensor:
    """Learnable sequences (arithmetic progressions mod VOCAB, random start and stride) so the loss falls fast
    and a wrong gradient shows up as a different curve, not as noise."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB  # (G, T+1)


def doc_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    """Packed documents of uneven length: row i has boundaries at different places (B, T+1)."""
    pos = torch.arange(tokens.shape[1])
    return torch.stack([(pos + 3 * i) // 7 for i in range(tokens.shape[0])])


def batches_for(dp_rank: int, layout: Layout, steps: int,
                doc_mask: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches, step after step (all TP/PP ranks of one DP rank get the same)."""
    for step in range(steps):
        tokens = global_batch(step)
        docs = doc_ids_for(tokens)
        for m in range(layout.grad_accum):
            rows = slice((dp_rank * layout.grad_accum + m) * layout.micro_batch_size,
                         (dp_rank * layout.grad_accum + m + 1) * layout.micro_batch_size)
            yield {"tokens": tokens[rows], "doc_ids": docs[rows]} if doc_mask else {"tokens": tokens[rows]}


def reference_run(model_overrides: list[str] = (), steps: int = STEPS, z_losses: list[float] | None = None
                  ) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Ground truth: the plain model, torch AdamW, clip_grad_norm_, whole global batch per step, one process.
    With `train.z_loss` among the overrides the loss trained on has the z-loss term, and the losses returned are
    the cross-entropy without it (as the engine reports them); each step's term is appended to `z_losses`."""
    cfg = load_config(None, case_config({"set": list(model_overrides)}))
    doc_mask = cfg.model.document_mask
    args = cfg.model.args(VOCAB)
    torch.manual_seed(0)
    kernels.use_loss_chunk(cfg.model.loss_chunk_tokens)
    model = Transformer(args, z_loss=cfg.train.z_loss)
    init_model(model, args, cfg.train.seed)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), o.weight_decay), lr=o.lr,
                            betas=(o.beta1, o.beta2), eps=o.eps)
    losses, norms = [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, o, cfg.train.max_steps)
        tokens = global_batch(step)
        doc_ids = doc_ids_for(tokens)[:, :-1] if doc_mask else None
        loss = model(tokens[:, :-1], tokens[:, 1:], doc_ids)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)))
        opt.step()
        z = model.output.z_loss.take().item() if cfg.train.z_loss else 0.0
        losses.append(loss.item() - z)
        if z_losses is not None:
            z_losses.append(z)
    kernels.use_loss_chunk(0)
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}
