"""The pipeline's error types.

Every bad input the pipeline can meet (a malformed JSON line, a corrupt shard, a tokenizer that does not
match the shards, ...) is reported as ONE line that names the file and the line or shard, so that a user
looking at a failed SLURM job log knows what to fix without reading a traceback. The CLI prints
`str(error)` and exits EXIT_BAD_INPUT; Python callers catch `DataError`.
"""
from __future__ import annotations

# The exit code of a bad input (config, data, checkpoint) for both CLIs, `pretrain-data` and `pretrain`; argparse
# uses the same for a bad command line.
EXIT_BAD_INPUT = 2


class DataError(Exception):
    """A bad input or a refused operation; `str(err)` is one line that names the culprit."""

    def __init__(self, message: str):
        # One line, always: a multi-line message from a library is folded so logs stay greppable.
        super().__init__(" ".join(str(message).split()))


class SourceError(DataError):
    """A raw corpus file cannot be read: names `file:line`."""


class TokenizerError(DataError):
    """A tokenizer cannot be trained/loaded, or it does not match the shards' manifest."""


class ManifestError(DataError):
    """manifest.json is missing, unreadable, or disagrees with the shards."""


class ShardError(DataError):
    """A shard is missing, truncated, corrupt, or fails its checksum: names the shard."""


class ShardMismatchError(ShardError):
    """A shard read to its end is not the one its manifest entry vouches for: another sample count, or other
    bytes (sha256). Raised by the loader at the shard's end, before any sample of its next shard is used."""


class LoaderStateError(DataError):
    """A loader state cannot be resumed here: other dataset, DP size, worker count, seed (or a bad state)."""
