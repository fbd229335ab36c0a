"""This project's model as an lm-evaluation-harness model, registered under the name `pretrain`.

    import pretrain.eval.lm  # registers "pretrain" with lm-eval
    lm_eval.simple_evaluate(model="pretrain", model_args="checkpoint=runs/debug", tasks=["hellaswag"])

On one process that is all; on many (`pretrain eval` under `python -m launch`, or the training loop's in-loop
evaluation) the model is a `Replica` of the live engine, and only replica leaders talk to lm-eval (see
pretrain/eval/replica.py). lm-eval splits requests across `rank` / `world_size`, which here are the
data-parallel rank and size: a replica is one "process" to it.

Requests are answered by the model's own output head in token chunks (`Engine.score`: log p of each target and
whether it is the argmax), never the (tokens x vocabulary) log-softmax lm-eval's `hf` backend builds, and are
batched longest first as that backend does, so a batch's padding is small.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from pretrain.eval.replica import Replica
from pretrain.eval.session import live, open_session


class CannotEvaluate(ValueError):
    """A request this layout or mode cannot answer: one line for the user (pretrain eval exits 2 with it)."""


@register_model("pretrain")
class PretrainLM(TemplateLM):
    def __init__(self, replica: Replica, tokenizer: Any, max_length: int, batch_size: int = 8,
                 vocab_size: int | None = None) -> None:
        super().__init__()
        if not replica.leader:
            raise RuntimeError("only a replica's leader (tp 0, pp 0) talks to lm-eval; the others serve()")
        self.replica, self.tok = replica, tokenizer
        self.max_length = max_length
        self.batch_size = max(1, int(batch_size))
        self.vocab_size = vocab_size or tokenizer.vocab_size  # ids past it are the model's padding rows
        self._rank, self._world_size = replica.env.dp_rank, replica.env.dp_size

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "PretrainLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "PretrainLM":
        """`--model_args checkpoint=PATH[,batch_size=N]`: the replica `pretrain eval` built for PATH, or (plain
        `lm_eval.simple_evaluate` in one process) a one-process replica built here."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        batch_size = arg_dict.get("batch_size", extra.get("batch_size", 8))
        if isinstance(batch_size, str) and not batch_size.isdigit():
            batch_size = 8  # "auto": lm-eval's probing of the largest batch is for its hf backend; ours is fixed
        checkpoint = arg_dict.get("checkpoint")
        if not checkpoint:
            raise ValueError("--model_args needs checkpoint=PATH (a run dir, a step_N dir or an import-hf output)")
        session = live(str(checkpoint)) or open_session(str(checkpoint), tokenizer=arg_dict.get("tokenizer"),
                                                       dtype=arg_dict.get("dtype"))
        return cls(session.replica, session.tokenizer, session.run.model.max_seq_len, batch_size=int(batch_size))

    # ----------------------------------------------------------------------------------- what lm-eval reads

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """Documents were packed as ...<eos>doc<eos>...: an eos before a text reads as "a document starts"."""
        return self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return f"pretrain-{self.tok.identity[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode_batch([string])[0]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    # Data-parallel replicas, as lm-eval sees them: the leaders' group.
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        t = tensor.reshape(-1).to(self.replica.env.comm_device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.replica.dp_group)
        return torch.cat(out)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.replica.dp_group)
        return out if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.replica.dp_group)

    # -------------------------------------------------------------------------------------------- scoring

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Each (context, continuation) pair -> (sum of the continuation's log p, every token greedy)."""
        def longest_first(req: tuple[Any, list[int], list[int]]) -> tuple[int, tuple[int, ...]]:
            whole = req[1] + req[2]
            return -len(whole), tuple(whole)

        order = Collator(requests, sort_fn=longest_first)
        batches = list(order.get_batched(n=self.batch_size))
        answers: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Scoring requests")
        for chunk in batches:
            windows = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in chunk]
            for (key, _, cont), scores in zip(chunk, self.replica.score(windows)):
                mine = scores[-len(cont):]
                answer = (float(mine[:, 0].double().sum()), bool(mine[:, 1].all()))
                answers.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        for _ in range(self.replica.lockstep(len(batches)) - len(batches)):
            self.replica.pad()
        bar.close()
        return order.get_original(answers)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of a whole text, in disjoint windows of the model's context (lm-eval's rule)."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----------------------------------------------------------------------------------------- generation

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding with the KV cache until an `until` string, eos or `max_gen_toks` (pp = 1)."""
        if self.replica.engine.pipeline:
            raise CannotEvaluate("generation tasks need the whole model on one pipeline stage: evaluate this "
                             "checkpoint with --pp 1 (a checkpoint of any layout is re-sliced)")
        if self.replica.engine.cfg.parallel.zero_stage == 3 and self.world_size > 1:
            raise CannotEvaluate("generation tasks under ZeRO-3 with several data-parallel replicas are not supported; "
                             "use `pretrain eval` (ZeRO-0) for them")
        out = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="Generating"):
            context, kwargs = req.args
            text = self._generate(context, dict(kwargs))
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def _generate(self, context: str, kwargs: dict[str, Any]) -> str:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
            raise CannotEvaluate("pretrain's lm-eval model decodes greedily; the task asks to sample "
                             f"({kwargs}); set do_sample=false / temperature=0 in --gen_kwargs")
        # As lm-eval's hf backend does: the context alone (no prefix token), cut from the left to leave room.
        prompt = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
        max_new = min(max_new, self.max_length - len(prompt))
        new: list[int] = []
        logits = self.replica.logits(prompt, 0)
        while len(new) < max_new:
            nxt = int(torch.argmax(logits[:self.vocab_size]))
            if nxt == self.eot_token_id:
                break
            new.append(nxt)
            text = self.tok_decode(new)
            if any(stop in text for stop in until):
                break
            if len(new) < max_new:
                logits = self.replica.logits([nxt], len(prompt) + len(new) - 1)
        text = self.tok_decode(new)
        for stop in until:
            text = text.split(stop)[0]
        return text
