"""TokenLoader across a change of DP size / worker count: the rest of the epoch is re-split exactly.

The documents' lengths are multiples of one batch (batch_size x (seq_len + 1) tokens), so no slot ever ends
an epoch on an incomplete batch: nothing is dropped, and the tokens seen over the run must equal the corpus
exactly, as a multiset (document i is `[i] * (len - 1) + [eos]`, so any token says which document it is from).
"""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from dp_helpers import write_synthetic_shards

from data_pipeline.loader import LoaderStateError, TokenLoader, merge_states

SEQ, BATCH = 3, 2          # a batch is 2 rows of 4 tokens = 8 tokens
NEED = BATCH * (SEQ + 1)
BUFFER = 6                 # partly read segments leave scattered holes: the re-split must respect them


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """150 documents of 8..48 tokens in 5 shards of uneven size; a second source for mixtures."""
    root = tmp_path_factory.mktemp("reshard")
    rng = np.random.default_rng(7)
    lengths = (rng.integers(1, 7, size=150) * NEED).tolist()
    docs = write_synthetic_shards(root / "a", lengths, docs_per_shard=[41, 17, 35, 30, 27])
    other = (rng.integers(1, 4, size=40) * NEED).tolist()
    docs_b = write_synthetic_shards(root / "b", other, docs_per_shard=[25, 15], first_value=10_000)
    ragged = write_synthetic_shards(root / "c", rng.integers(3, 60, size=120).tolist(), docs_per_shard=[50, 70])
    return {"a": str(root / "a"), "b": str(root / "b"), "c": str(root / "c"),
            "tokens": Counter(np.concatenate(docs).tolist()), "tokens_b": Counter(np.concatenate(docs_b).tolist()),
            "ragged": ragged}


def loader(src, dp_rank: int, dp_size: int, workers: int, epochs: int | None, **kw) -> TokenLoader:
    return TokenLoader(src, seq_len=SEQ, batch_size=BATCH, dp_rank=dp_rank, dp_size=dp_size, num_workers=workers,
                       seed=5, shuffle_buffer=BUFFER, epochs=epochs, **kw)


def take(it, n: int | None) -> list[int]:
    """Tokens of the next n batches (all remaining with None)."""
    out = []
    for i, batch in enumerate(it):
        out.extend(batch["tokens"].flatten().tolist())
        if n is not None and i + 1 == n:
            break
    return out


def checkpoint(loaders: list[TokenLoader]) -> list[dict]:
    """What a training checkpoint stores: each rank's state, through JSON (as in rank_<r>.pt)."""
    return [json.loads(json.dumps(ld.state_dict())) for ld in loaders]


STAGES = [  # (name, epochs, [(dp_size, num_workers, batches per rank or None: to the end)])
    ("dp2x2 -> dp1, in-process", 1, [(2, 2, [37, 20]), (1, 0, None)]),
    ("dp2x2 -> dp4x2", 1, [(2, 2, [37, 20]), (4, 2, None)]),
    ("dp2x2 -> dp3x1 -> dp1x2, two epochs", 2, [(2, 2, [300, 30]), (3, 1, [40, 9, 150]), (1, 2, None)]),
]


@pytest.mark.parametrize("name,epochs,stages", STAGES, ids=[s[0] for s in STAGES])
def test_dp_change_sees_every_document_exactly_once(corpus, name, epochs, stages):
    seen: list[int] = []
    states = None
    for dp_size, workers, counts in stages:
        loaders = [loader(corpus["a"], r, dp_size, workers, epochs) for r in range(dp_size)]
        for r, ld in enumerate(loaders):
            if states is not None:
                ld.load_state_dict(states)  # every old rank's state: the layout changed
                assert ld.resume_note and "re-partitioning" in ld.resume_note
            seen += take(ld, None if counts is None else counts[r])
        states = checkpoint(loaders)
    expected = Counter({tok: n * epochs for tok, n in corpus["tokens"].items()})
    got = Counter(seen)
    assert got == expected, (f"{name}: lost {sum((expected - got).values())} tokens, "
                             f"repeated {sum((got - expected).values())}")


def test_ragged_documents_lose_only_the_logged_final_tails(corpus, caplog):
    """Any document lengths: after the change, tokens are missing only where a slot's last incomplete batch
    was dropped at the end of the epoch (logged), and nothing is repeated."""
    olds = [loader(corpus["c"], r, 2, 2, 1) for r in range(2)]
    seen = take(olds[0], 61) + take(olds[1], 23)
    states = checkpoint(olds)
    with caplog.at_level("WARNING", logger="data_pipeline.loader"):
        for r in range(2):  # in-process slots, so their end-of-epoch log lines reach caplog
            new = loader(corpus["c"], r, 2, 0, 1)
            new.load_state_dict(states)
            seen += take(new, None)
    dropped = [int(n) for n in re.findall(r"dropped the last incomplete batch \((\d+) tokens\)", caplog.text)]
    expected = Counter(np.concatenate(corpus["ragged"]).tolist())
    got = Counter(seen)
    assert not got - expected, "a document was packed twice"
    assert sum((expected - got).values()) == sum(dropped) and len(dropped) <= 2
    assert re.search(r"and [1-9]\d* partly packed", new.resume_note), "the test must cut documents at the change"


def test_the_log_line_counts_what_is_re_split(corpus, caplog):
    olds = [loader(corpus["a"], r, 2, 2, 1) for r in range(2)]
    before = take(olds[0], 37) + take(olds[1], 20)
    values = Counter(t for t in before if t != 0)
    consumed = len(values)  # a document is consumed once its first tokens were packed
    lengths = {t: n for t, n in corpus["tokens"].items() if t != 0}
    partly = sum(values[v] < lengths[v] for v in values)
    new = loader(corpus["a"], 0, 1, 0, 1)
    with caplog.at_level("WARNING", logger="data_pipeline.loader"):
        new.load_state_dict(checkpoint(olds) * 2)  # TP/PP peers' files hold the same states: accepted
    line = f"({150 - consumed} of epoch 0) and {partly} partly packed document(s) from dp 2 x 2 worker(s) to dp 1 x 1"
    assert line in new.resume_note and new.resume_note in caplog.text and "\n" not in new.resume_note
    assert partly >= 1, "the test must cover documents cut at the change"


def test_same_layout_from_all_ranks_states_continues_the_identical_stream(corpus):
    full = take(loader(corpus["a"], 1, 2, 2, None), 40)
    olds = [loader(corpus["a"], r, 2, 2, None) for r in range(2)]
    head = take(olds[0], 9) + take(olds[1], 13)
    resumed = loader(corpus["a"], 1, 2, 2, None)
    resumed.load_state_dict(merge_states(checkpoint(olds)))  # a merged state works like the list
    assert resumed.resume_note is None
    assert head[len(take(loader(corpus["a"], 0, 2, 2, None), 9)):] + take(resumed, 27) == full


def test_a_second_resume_after_the_change_is_exact_too(corpus):
    """After a re-split, same-layout save/resume continues the identical stream (history and carries kept)."""
    olds = [loader(corpus["a"], r, 2, 2, 1) for r in range(2)]
    take(olds[0], 15), take(olds[1], 4)
    states = checkpoint(olds)

    def resumed():
        ld = loader(corpus["a"], 0, 1, 2, 1)
        ld.load_state_dict(states)
        return ld

    full = take(resumed(), None)
    first = resumed()
    head = take(first, 3)
    again = loader(corpus["a"], 0, 1, 2, 1)
    again.load_state_dict(checkpoint([first]))
    assert head + take(again, None) == full


def test_a_version_1_state_from_before_layout_changes_still_resumes(corpus):
    full = take(loader(corpus["a"], 0, 1, 2, None), 30)
    old = loader(corpus["a"], 0, 1, 2, None)
    head = take(old, 11)
    state = checkpoint([old])[0]
    del state["history"]
    for c in state["cursors"]:
        del c["carry"]
    resumed = loader(corpus["a"], 0, 1, 2, None)
    resumed.load_state_dict(dict(state, version=1))
    assert head + take(resumed, 19) == full


def test_mixture_dp_change_repeats_nothing_and_keeps_mixing(corpus):
    srcs = [corpus["a"], corpus["b"]]
    olds = [loader(srcs, r, 2, 2, 1, weights=[0.5, 0.5]) for r in range(2)]
    seen = take(olds[0], 30) + take(olds[1], 18)
    new = loader(srcs, 0, 1, 1, 1, weights=[0.5, 0.5])
    new.load_state_dict(checkpoint(olds))
    assert re.search(r"source 0: \d+ of epoch 0; source 1: \d+ of epoch 0", new.resume_note)
    after = take(new, None)
    total = Counter(seen + after)
    corpus_all = corpus["tokens"] + corpus["tokens_b"]
    assert not total - corpus_all, "a document was packed twice"
    assert any(t >= 10_000 for t in after) and any(0 < t < 10_000 for t in after)


def test_refusals_name_the_problem(corpus):
    olds = [loader(corpus["a"], r, 2, 2, None) for r in range(2)]
    take(olds[0], 5), take(olds[1], 5)
    states = checkpoint(olds)
    with pytest.raises(LoaderStateError, match=r"dataset changed \(fingerprint") as err:
        loader(corpus["b"], 0, 1, 1, None).load_state_dict(states)  # all ranks' states, but other shards
    assert "\n" not in str(err.value)
    # `pretrain train` users set the config key, not the keyword; the restart is of the earliest saved epoch
    assert "data.reshard=true" in str(err.value) and "earliest saved epoch" in str(err.value)
    with pytest.raises(LoaderStateError, match=r"dp_size 2 -> 4.*all old DP ranks.*dp rank\(s\) \[1\] of 2 are "
                                               r"missing.*reshard=True"):
        loader(corpus["a"], 0, 4, 1, None).load_state_dict(states[0])  # one rank's state cannot be re-split
    tampered = json.loads(json.dumps(states[1]))
    tampered["seed"] = 6
    with pytest.raises(LoaderStateError, match="disagree on seed"):
        merge_states([states[0], tampered])
    ahead = checkpoint([olds[0]])[0]
    take(olds[0], 1)
    with pytest.raises(LoaderStateError, match="two different states for dp rank 0"):
        merge_states([ahead, checkpoint([olds[0]])[0], states[1]])
    with pytest.raises(LoaderStateError, match="dp_rank 0 -> 1"):
        loader(corpus["a"], 1, 2, 2, None).load_state_dict(states[0])
    restarted = loader(corpus["a"], 0, 4, 1, None, reshard=True)
    restarted.load_state_dict(states[0])
    assert "restarting at the start of epoch(s) [0]" in restarted.resume_note
    assert torch.is_tensor(next(iter(restarted))["tokens"])


def test_the_layout_history_in_the_state_stays_short(corpus):
    """A change made after the previous change's epoch is over forgets the older layout: states stay small."""
    olds = [loader(corpus["c"], r, 2, 2, None) for r in range(2)]
    take(olds[0], 5), take(olds[1], 5)
    once = loader(corpus["c"], 0, 1, 0, None)
    once.load_state_dict(checkpoint(olds))
    take(once, 30)
    assert len(once.state_dict()["history"]) == 1
    twice_early = loader(corpus["c"], 0, 2, 1, None)
    twice_early.load_state_dict(checkpoint([once]))  # still inside the re-split epoch: both layouts kept
    assert len(twice_early.state_dict()["history"]) == 2
    take(once, 600)  # well into epoch 1 (the corpus is ~460 batches)
    twice_late = loader(corpus["c"], 0, 2, 1, None)
    twice_late.load_state_dict(checkpoint([once]))
    assert [c["dp_size"] for c in twice_late.state_dict()["history"]] == [1]
