"""A webdataset-style error handler that counts instead of sleeping.

`webdataset.warn_and_continue` sleeps 0.5 s per error (so a corrupt shard of 10k samples stalls a job for
over an hour) and never gives up. `CountingHandler(max_errors)` logs one line per error, continues while the
count is at most `max_errors`, then raises a one-line ShardError. It works anywhere webdataset takes a
`handler=` (e.g. `wds.WebDataset(urls, handler=CountingHandler(10))`) and is what TokenLoader uses for
`max_bad_shards`.
"""
from __future__ import annotations

import logging
from collections import Counter

from data_pipeline.errors import ShardError

log = logging.getLogger(__name__)


class CountingHandler:
    def __init__(self, max_errors: int = 0, what: str = "errors"):
        self.max_errors = max_errors
        self.what = what
        self.count = 0
        self.by_type: Counter = Counter()

    def __call__(self, exn: BaseException) -> bool:
        """True = skip and continue; raises once more than `max_errors` errors have been seen."""
        self.count += 1
        self.by_type[type(exn).__name__] += 1
        message = " ".join(str(exn).split())
        if self.count > self.max_errors:
            raise ShardError(f"{message} ({self.count} {self.what}, more than the {self.max_errors} allowed)")
        log.warning("skipped (%d/%d %s allowed): %s", self.count, self.max_errors, self.what, message)
        return True
