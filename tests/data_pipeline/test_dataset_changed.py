"""A resume on changed data names the change: the shards added, removed or modified (and which of their manifest
facts differ), or the mixture weights, in the loader's one-line refusal; a state saved before the loader recorded
its dataset gets the old fingerprint-only line. Real shards made by `pretrain-data`, edited as a user would
(a shard deleted with its manifest entry, one re-prepared from other text)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from dp_helpers import make_docs, write_jsonl

from data_pipeline.cli import main as data_cli
from data_pipeline.loader import LoaderStateError, TokenLoader
from data_pipeline.manifest import read_manifest, write_manifest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Two preparations with one tokenizer: `a` (4 shards) and `b` (other text, as many shards or more)."""
    root = tmp_path_factory.mktemp("changed")
    write_jsonl(root / "a.jsonl", make_docs(240, seed=1, prefix="alpha"))
    write_jsonl(root / "b.jsonl", make_docs(240, seed=2, prefix="beta"))
    assert data_cli(["train-tokenizer", "--input", str(root / "a.jsonl"), "--vocab-size", "300",
                     "--out", str(root / "tok")]) == 0
    for name in ("a", "b"):
        assert data_cli(["prepare", "--input", str(root / f"{name}.jsonl"), "--tokenizer", str(root / "tok"),
                         "--out", str(root / name), "--shard-size-mb", "0.03", "--workers", "0",
                         "--no-progress"]) == 0
    assert len(read_manifest(str(root / "a")).shards) >= 3
    return {"a": root / "a", "b": root / "b", "root": root}


def _loader(source: str | list[str], **kw) -> TokenLoader:
    return TokenLoader(source, seq_len=31, batch_size=2, seed=3, **kw)


def _saved_on(source: str | list[str], **kw) -> dict:
    loader = _loader(source, **kw)
    next(iter(loader))
    return loader.state_dict()


def _refusal(state: dict, source: str | list[str], **kw) -> str:
    with pytest.raises(LoaderStateError) as err:
        _loader(source, **kw).load_state_dict(state)
    message = str(err.value)
    assert message.startswith("cannot resume the data loader exactly: dataset changed (fingerprint ")
    assert "\n" not in message
    return message


def _edited(src: Path, dest: Path, *, drop: str | None = None, replace: tuple[Path, str] | None = None) -> Path:
    """A copy of shard directory `src` with shard `drop` deleted (file and manifest entry), or shard
    `replace[1]` replaced by the shard of that name in directory `replace[0]` (file and manifest entry)."""
    shutil.copytree(src, dest)
    manifest = read_manifest(str(dest))
    shards = list(manifest.shards)
    if drop is not None:
        (dest / drop).unlink()
        shards = [s for s in shards if s.name != drop]
    if replace is not None:
        other, name = replace
        shutil.copy2(other / name, dest / name)
        theirs = next(s for s in read_manifest(str(other)).shards if s.name == name)
        shards = [theirs if s.name == name else s for s in shards]
    write_manifest(str(dest), dataclasses.replace(manifest, shards=tuple(shards)))
    return dest


def test_added_removed_and_modified_shards_are_named(prepared, tmp_path):
    a, b = prepared["a"], prepared["b"]
    names = [s.name for s in read_manifest(str(a)).shards]
    last = names[-1]
    fewer = _edited(a, tmp_path / "fewer", drop=last)

    msg = _refusal(_saved_on(str(a)), str(fewer))
    assert f": shards removed: {last})" in msg, msg
    msg = _refusal(_saved_on(str(fewer)), str(a))
    assert f": shards added: {last})" in msg, msg

    redone = _edited(a, tmp_path / "redone", replace=(b, names[1]))
    msg = _refusal(_saved_on(str(a)), str(redone))
    assert f": shards modified: {names[1]} (" in msg and "sha256" in msg and "added" not in msg, msg


def test_mixture_weights_change_is_named(prepared):
    a, b = str(prepared["a"]), str(prepared["b"])
    msg = _refusal(_saved_on([a, b], weights=[1, 1]), [a, b], weights=[1, 3])
    assert ": mixture weights [0.5, 0.5] -> [0.25, 0.75])" in msg, msg


def test_a_state_without_the_record_gets_the_fingerprint_line(prepared, tmp_path):
    state = _saved_on(str(prepared["a"]))
    del state["dataset"]  # as saved before the loader recorded its dataset
    fewer = _edited(prepared["a"], tmp_path / "fewer", drop=read_manifest(str(prepared["a"])).shards[0].name)
    assert ": other shards, manifest or weights)" in _refusal(state, str(fewer))
