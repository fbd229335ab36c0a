"""One model replica (its TP x PP ranks) answering evaluation requests as one model.

An evaluation harness is a single-process program: it tokenizes, sorts and batches requests and wants numbers
back. Only the replica's *leader* (tensor rank 0 on pipeline stage 0) runs it; the replica's other ranks
*follow*: `serve()` waits for the leader's next command (a batch to score, a decoding step, done), received by
broadcast over the replica's model-parallel group, and runs the same collective forward with it. Megatron-LM's
text-generation server works the same way. Data-parallel replicas each take a share of the requests (the
harness splits them by `dp_rank`); their leaders agree on how many forwards each request list costs
(`lockstep`), since under PP every scoring forward begins with a barrier of all ranks, and under ZeRO-3 every
forward gathers parameters across data-parallel ranks.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from pretrain.model.transformer import KVCache
from pretrain.run.distributed import DistEnv
from pretrain.train.engine import Engine

_PAD = 0  # right padding of a scoring batch: causal attention never lets a real position see it


class Replica:
    def __init__(self, engine: Engine, env: DistEnv) -> None:
        from megatron.core import parallel_state

        self.engine, self.env = engine, env
        self.leader = env.tp_rank == 0 and env.pp_rank == 0
        self.group = parallel_state.get_model_parallel_group()  # this replica's TP x PP ranks
        self.leader_rank = min(dist.get_process_group_ranks(self.group))
        if self.leader and env.rank != self.leader_rank:
            raise RuntimeError(f"rank {env.rank}: the replica's tp 0 / pp 0 rank is not its lowest rank")
        self.size = dist.get_world_size(self.group)
        # The leaders of all replicas (tp 0, pp 0 of each): megatron-core's data-parallel group of this coordinate.
        self.dp_group = parallel_state.get_data_parallel_group()
        self._cache: KVCache | None = None

    # ------------------------------------------------------------------------------------- the leader's side

    def score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """For each token sequence, (len - 1, 2) fp32 on the host: each next token's (log p, is the argmax)."""
        self._tell(("score", [list(s) for s in sequences]))
        return self._score(sequences)

    def logits(self, tokens: Sequence[int], start_pos: int, batch: int = 1) -> torch.Tensor:
        """Decoding with the KV cache (pp = 1): the whole-vocabulary logits (V,) after feeding `tokens` at
        `start_pos` (0 starts a new cache of the model's context length)."""
        self._tell(("logits", list(tokens), start_pos))
        return self._logits(tokens, start_pos)

    def lockstep(self, mine: int) -> int:
        """How many forwards every replica's leader will issue for its request list: the most any has. A leader
        with fewer issues `pad()` for the difference."""
        if self.env.dp_size == 1:
            return mine
        t = torch.tensor([mine], dtype=torch.int64, device=self.env.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.dp_group)
        return int(t.item())

    def pad(self) -> None:
        """A forward whose answer nobody reads, so that this replica keeps step with the others."""
        self.score([[_PAD, _PAD]])

    def close(self) -> None:
        """Release the followers (always, even when the harness failed: they would wait forever)."""
        self._tell(("done",))

    # ----------------------------------------------------------------------------------- the followers' side

    def serve(self) -> None:
        """Run the leader's commands until it says done."""
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=self.leader_rank, group=self.group)
            command = box[0]
            if command[0] == "done":
                return
            if command[0] == "score":
                self._score(command[1])
            elif command[0] == "logits":
                self._logits(command[1], command[2])
            else:
                raise RuntimeError(f"unknown evaluation command {command[0]!r} from rank {self.leader_rank}")

    # ----------------------------------------------------------------------------------------------- both

    def _tell(self, command: tuple) -> None:
        if self.size > 1:
            dist.broadcast_object_list([command], src=self.leader_rank, group=self.group)

    def _score(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        width = max(len(s) for s in sequences)
        batch = torch.full((len(sequences), width), _PAD, dtype=torch.long)
        for i, s in enumerate(sequences):
            batch[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        out = self.engine.score(batch[:, :-1], batch[:, 1:]).cpu()  # (B, width - 1, 2)
        return [out[i, :len(s) - 1] for i, s in enumerate(sequences)]

    def _logits(self, tokens: Sequence[int], start_pos: int) -> torch.Tensor:
        if start_pos == 0:
            self._cache = self.engine.new_cache()
        return self.engine.decode(tokens, start_pos, self._cache).cpu()
