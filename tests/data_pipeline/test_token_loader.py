"""TokenLoader: exact split across DP ranks x workers, shuffling, packing, and exact resume."""
from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from dp_helpers import write_synthetic_shards

from data_pipeline.loader import LoaderStateError, TokenLoader

SEQ = 15          # rows of 16 tokens
BATCH = 2         # -> at most 31 tokens dropped at the end of a finite run, per slot


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """7 shards with uneven document counts (total 203: not divisible by 4 slots), docs of 40-90 tokens."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    lengths = rng.integers(40, 91, size=203).tolist()
    write_synthetic_shards(root / "a", lengths, docs_per_shard=[40, 13, 37, 29, 31, 24, 29])
    other = rng.integers(30, 60, size=60).tolist()
    write_synthetic_shards(root / "b", other, docs_per_shard=[30, 30], first_value=10_000)
    return {"a": root / "a", "a_lengths": lengths, "b": root / "b", "b_lengths": other, "root": root}


def take(loader, n: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if n is not None and len(out) == n:
            break
    return out


def test_two_ranks_two_workers_see_every_document_exactly_once(synthetic):
    lengths = synthetic["a_lengths"]
    seen = Counter()
    per_rank_values = []
    for rank in (0, 1):
        loader = TokenLoader(str(synthetic["a"]), seq_len=SEQ, batch_size=BATCH, dp_rank=rank, dp_size=2,
                             num_workers=2, seed=3, shuffle_buffer=8, epochs=1)
        batches = take(loader)
        assert all(b["tokens"].shape == (BATCH, SEQ + 1) and b["tokens"].dtype == torch.int64 for b in batches)
        tokens = torch.cat([b["tokens"].flatten() for b in batches]).numpy()
        values = Counter(tokens[tokens != 0].tolist())
        per_rank_values.append(set(values))
        seen.update(values)
    assert not per_rank_values[0] & per_rank_values[1], "a document was read by both ranks"
    assert set(seen) == set(range(1, len(lengths) + 1)), "a document was never read"
    short = [v for v in seen if seen[v] != lengths[v - 1] - 1]
    assert all(seen[v] < lengths[v - 1] - 1 for v in short), "a document was read twice"
    assert len(short) <= 4, "only the last document of each of the 4 slots may be cut by the dropped tail"


def test_every_epoch_reads_everything_once_in_a_new_shard_order(synthetic):
    lengths = synthetic["a_lengths"]
    loader = TokenLoader(str(synthetic["a"]), seq_len=SEQ, batch_size=BATCH, seed=5, shuffle_buffer=1, epochs=2)
    tokens = torch.cat([b["tokens"].flatten() for b in take(loader)]).numpy()
    docs = [int(v) for v in tokens[np.flatnonzero(tokens == 0) - 1]]  # the value before each eos = one doc
    first, second = docs[:len(lengths)], docs[len(lengths):]
    assert sorted(first) == list(range(1, len(lengths) + 1))
    assert sorted(second) == sorted(set(second)) and len(second) >= len(lengths) - 1
    assert first != second[:len(first)], "shard order must be reshuffled every epoch"
    # shuffle_buffer=1 keeps tar order inside a shard: runs of consecutive values (the shards)
    assert sum(b == a + 1 for a, b in zip(first, first[1:])) >= len(lengths) - 7


def test_shuffle_is_seeded(synthetic):
    def first_docs(seed, buffer):
        loader = TokenLoader(str(synthetic["a"]), seq_len=SEQ, batch_size=BATCH, seed=seed, shuffle_buffer=buffer)
        return torch.cat([b["tokens"].flatten() for b in take(loader, 20)]).tolist()

    assert first_docs(1, 16) == first_docs(1, 16)
    assert first_docs(1, 16) != first_docs(2, 16)
    assert first_docs(1, 16) != first_docs(1, 1)


def test_documents_are_packed_with_eos_and_numbered_for_masking(synthetic):
    loader = TokenLoader(str(synthetic["a"]), seq_len=63, batch_size=4, seed=0, document_mask=True)
    batch = take(loader, 3)[-1]
    tokens, doc_ids = batch["tokens"], batch["doc_ids"]
    assert doc_ids.shape == tokens.shape and doc_ids.dtype == torch.int64
    for row_t, row_d in zip(tokens.tolist(), doc_ids.tolist()):
        assert row_d[0] == 0
        for i in range(1, len(row_t)):
            # a new document starts right after an eos (id 0), and only there
            assert row_d[i] - row_d[i - 1] == (1 if row_t[i - 1] == 0 else 0)
            if row_d[i] == row_d[i - 1] and row_t[i - 1] != 0:
                assert row_t[i] in (row_t[i - 1], 0)  # same document: same value until its eos


CASES = [  # (name, loader kwargs, resume points)
    ("single", dict(num_workers=0), [0, 1, 9, 23]),
    ("2 workers, rank 1 of 2, doc mask", dict(num_workers=2, dp_rank=1, dp_size=2, document_mask=True), [1, 4, 11]),
    ("mixture of 2, 2 workers", dict(num_workers=2, weights=[0.3, 0.7], mixture=True), [3, 10]),
    ("finite epochs, workers run out", dict(num_workers=2, epochs=1, dp_size=2, batch_size=5), [5, 37]),
]


@pytest.mark.parametrize("name,kwargs,points", CASES, ids=[c[0] for c in CASES])
def test_resume_continues_the_identical_token_stream(synthetic, name, kwargs, points):
    kwargs = dict(kwargs)
    sources = [str(synthetic["a"]), str(synthetic["b"])] if kwargs.pop("mixture", False) else str(synthetic["a"])

    batch_size = kwargs.pop("batch_size", BATCH)

    def make():
        return TokenLoader(sources, seq_len=SEQ, batch_size=batch_size, seed=11, shuffle_buffer=16, **kwargs)

    full = take(make(), None if kwargs.get("epochs") else 60)
    assert len(full) >= 30
    for k in points:
        first = make()
        head = take(first, k) if k else []
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = make()
        resumed.load_state_dict(state)
        tail = take(resumed, len(full) - k)
        stream = head + tail
        assert len(stream) == len(full)
        for i, (a, b) in enumerate(zip(full, stream)):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), f"{name}: batch {i} ({key}) differs after resume at {k}"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_new_for_loop_continues_where_the_last_one_stopped(synthetic, workers):
    def make():
        return TokenLoader(str(synthetic["a"]), seq_len=SEQ, batch_size=BATCH, num_workers=workers, seed=4)

    loader = make()
    pieces = take(loader, 3) + take(loader, 4)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(take(make(), 7), pieces))


def test_state_counts_only_delivered_batches_not_prefetched_ones(synthetic):
    loader = TokenLoader(str(synthetic["a"]), seq_len=SEQ, batch_size=BATCH, num_workers=2, seed=1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state["batches_delivered"] == 1 and state["next_worker"] == 1
    assert state["cursors"][1] is None, "worker 1 prefetched batches, but none was handed to the caller"


def test_resume_refuses_other_dataset_dp_size_or_workers(synthetic, caplog):
    def make(src="a", **kw):
        args = dict(seq_len=SEQ, batch_size=BATCH, dp_size=2, num_workers=2, seed=0)
        args.update(kw)
        return TokenLoader(str(synthetic[src]), **args)

    loader = make()
    take(loader, 5)
    state = loader.state_dict()
    for other, expected in ((make("b"), "dataset changed (fingerprint"), (make(dp_size=4), "dp_size 2 -> 4"),
                            (make(num_workers=1), "num_workers 2 -> 1"), (make(seed=1), "seed 0 -> 1")):
        with pytest.raises(LoaderStateError) as err:
            other.load_state_dict(state)
        msg = str(err.value)
        assert expected in msg and "reshard=True" in msg and "\n" not in msg
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        resharded = make(dp_size=4, reshard=True)
        resharded.load_state_dict(state)
    assert "reshard" in caplog.text and "epoch(s) [0]" in caplog.text
    assert len(take(resharded, 2)) == 2


def test_sources_glob_brace_and_pipe_url_read_the_same_stream(synthetic):
    d = synthetic["a"]

    def stream(src):
        return torch.cat([b["tokens"] for b in take(TokenLoader(src, seq_len=SEQ, batch_size=BATCH, seed=2), 8)])

    reference = stream(str(d))
    assert torch.equal(stream(str(d / "shard-*.tar")), reference)
    assert torch.equal(stream(str(d / "shard-{000000..000006}.tar")), reference)
    assert torch.equal(stream(f"pipe:cat {d}/shard-{{000000..000006}}.tar"), reference)
    subset = TokenLoader(str(d / "shard-00000[0-1].tar"), seq_len=SEQ, batch_size=BATCH)
    assert subset.manifest.total_samples == 203  # the manifest of the directory...
    tokens = torch.cat([b["tokens"].flatten() for b in take(TokenLoader(
        str(d / "shard-00000[0-1].tar"), seq_len=SEQ, batch_size=BATCH, epochs=1))])
    assert set(tokens.unique().tolist()) - {0} <= set(range(1, 54)), "...but only the selected shards are read"


def test_mixture_weights_are_token_shares(synthetic):
    loader = TokenLoader([str(synthetic["a"]), str(synthetic["b"])], seq_len=63, batch_size=8, seed=0,
                         weights=[0.25, 0.75])
    tokens = torch.cat([b["tokens"].flatten() for b in take(loader, 60)])
    share_b = (tokens >= 10_000).float().mean().item()
    assert 0.65 < share_b < 0.85, share_b
    assert loader.manifest.eos_id == 0 and loader.manifest.vocab_size == 1 << 20
