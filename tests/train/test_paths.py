"""Every name under `checkpoint.dir` is spelled once, in pretrain/run/paths.py: no other module of the product
writes one as a string literal, so renaming a file is one edit and no reader looks for a name no writer uses."""
from __future__ import annotations

import io
import re
import tokenize

from spawn import REPO

from pretrain.run import paths

HOME = "pretrain/run/paths.py"
# Names no other string of the product spells: refused wherever they appear as a whole literal.
DISTINCT = [paths.LATEST, paths.LOCK_FILE, paths.GUARD_FILE, paths.METRICS_FILE, paths.SEGMENTS_FILE,
            paths.SUMMARY_FILE, paths.ROLLBACKS_FILE, paths.MLFLOW_DIR, paths.MLFLOW_DB, paths.META, paths.CONFIG,
            paths.DIGESTS, paths.TEMP_PREFIX]
# Everyday words ("model", "weights", ...) that are also dict keys and options: refused where a path is joined.
JOINED = [paths.MANIFEST, paths.TOKENIZER_DIR, paths.MODEL_DIR, paths.IMPORTED_WEIGHTS, paths.ROLLBACK_STATES_DIR,
          paths.PROFILE_DIR, paths.HF_EXPORTS_DIR]
JOIN = re.compile(r"""(/\s*|joinpath\(|os\.path\.join\([^)]*,\s*)["'](%s)["']""" % "|".join(map(re.escape, JOINED)))
# `step_<n>` and `rank_<r>.pt`, built by a format string (export directories have temp names of their own).
FORMATTED = re.compile(r"""f["'](step_|rank_)\{""")


def _literals(source: str) -> list[tuple[int, str]]:
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and tok.string[-1] in "'\"" and not tok.string.startswith(('"""', "'''")):
            body = tok.string.lstrip("rbuRBU")
            out.append((tok.start[0], body[1:-1]))
    return out


def test_no_module_but_paths_spells_a_run_directory_name():
    found = []
    for package in ("pretrain", "launch"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            if rel == HOME:
                continue
            source = path.read_text(encoding="utf-8")
            found += [f"{rel}:{line}: {text!r}" for line, text in _literals(source) if text in DISTINCT]
            found += [f"{rel}:{source[:m.start()].count(chr(10)) + 1}: {m.group(0)}" for m in JOIN.finditer(source)]
            found += [f"{rel}:{source[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
                      for m in FORMATTED.finditer(source)]
    assert found == [], "run-directory names spelled outside pretrain/run/paths.py:\n" + "\n".join(found)


def test_the_table_names_every_file_it_defines():
    """The module docstring is the map README points to: each defined name appears in it."""
    names = [v for k, v in vars(paths).items() if k.isupper() and isinstance(v, str)]
    missing = [n for n in names if n not in paths.__doc__]
    assert missing == [], missing
