"""DeepSpeed's view of megatron-core's process groups.

DeepSpeed asks a "model parallel unit" six questions (model-parallel and data-parallel rank / size / group) to
know which ranks share gradients (DP: ZeRO partitions and all-reduces over it) and which hold different slices of
one model (MP: grad norms sum over it, non-TP params count once). Answering from `parallel_state` means there is
one source of truth for the groups.

Context parallelism (DeepSpeed-Ulysses): DeepSpeed asks the mpu for a "sequence parallel" group (megatron-core's
context-parallel group) and a "sequence data parallel" group (DP x CP, megatron-core's data-parallel group with
context parallelism): gradients are all-reduced and ZeRO partitions spread over DP x CP (what each rank's loss is
then divided by: pretrain.parallel.context.backward_loss_divisor).

Only the non-pipeline engine takes an mpu; the pipeline engine builds its own grid from
`PipeModelDataParallelTopology`, which assigns the same ranks (both order ranks tp-dp-pp, TP fastest;
`pretrain.parallel.pipeline` checks it).
"""
from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMpu:
    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(ps.get_data_parallel_group())

    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_context_parallel_group()

    def get_sequence_parallel_world_size(self) -> int:
        return ps.get_context_parallel_world_size()

    def get_sequence_parallel_rank(self) -> int:
        return ps.get_context_parallel_rank()

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return ps.get_data_parallel_group(with_context_parallel=True)

    def get_sequence_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_sequence_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank(with_context_parallel=True)
