"""`pretrain-data`: train a tokenizer, turn a corpus into token shards, verify and inspect them.

Every failure caused by input (a bad line, a corrupt shard, a mismatched tokenizer) prints ONE line naming the
file and line/shard and exits 2 (EXIT_BAD_INPUT, as `pretrain` does); nothing prints a traceback for bad data.
"""
from __future__ import annotations

import argparse
import sys

from data_pipeline.errors import EXIT_BAD_INPUT, DataError

EXAMPLES = """examples:
  pretrain-data train-tokenizer --input 'corpus/*.jsonl.zst' --vocab-size 32000 --out tok/
  pretrain-data prepare --input 'corpus/*.jsonl.zst' --tokenizer tok/ --out shards/
  pretrain-data verify shards/ --tokenizer tok/
  pretrain-data inspect shards/
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain-data", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Raw text corpus -> tokenizer -> webdataset token shards (+ manifest.json) for `pretrain`.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inputs_help = ("a file, glob or directory of corpus files; repeatable. Formats: JSONL (.jsonl/.json/.ndjson, "
                   "optionally .gz or .zst) with one JSON object per line, Parquet (a string column), .txt (one "
                   "file = one document)")
    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer (bos/eos/pad special tokens)",
                       description="Train a byte-level BPE with HF tokenizers; writes OUT/tokenizer.json. Byte-level "
                                   "means any text round-trips exactly (no unknown token).")
    t.add_argument("--input", action="append", required=True, metavar="PATH_OR_GLOB", help=inputs_help)
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including the 3 special tokens")
    t.add_argument("--out", required=True, metavar="DIR", help="directory to write tokenizer.json into")
    t.add_argument("--text-key", default="text", help="JSON key / Parquet column holding the text (default: text)")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default: 2)")
    t.add_argument("--skip-bad", action="store_true", help="skip and count bad documents instead of stopping")

    pr = sub.add_parser("prepare", help="tokenize a corpus into webdataset .tar shards + manifest.json",
                        description="Tokenize documents in parallel (the tokenizer's batch encoder), append eos to "
                                    "each, and write webdataset shards (tokens.npy + source.txt per document) plus "
                                    "manifest.json with the tokenizer hash, counts and sha256 of every shard.")
    pr.add_argument("--input", action="append", required=True, metavar="PATH_OR_GLOB", help=inputs_help)
    pr.add_argument("--tokenizer", required=True, metavar="TOK",
                    help="a directory with tokenizer.json, a tokenizer.json file, or a sentencepiece .model file")
    pr.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or absent)")
    pr.add_argument("--text-key", default="text", help="JSON key / Parquet column holding the text (default: text)")
    pr.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size in MB (default: 256)")
    pr.add_argument("--workers", type=int, default=None,
                    help="tokenizer worker processes (default: one per CPU core; 0 = in-process Rust threads)")
    pr.add_argument("--overwrite", action="store_true", help="replace the shards and manifest already in --out")
    pr.add_argument("--skip-bad", action="store_true",
                    help="skip bad documents (malformed JSON, missing text, invalid UTF-8, empty) and report "
                         "counts at the end instead of stopping at the first")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")

    v = sub.add_parser("verify", help="check shards against manifest.json (sha256, decodability, counts)",
                       description="Check every shard: size and sha256 as recorded, every sample decodes, ids < vocab, "
                                   "eos-terminated, counts match. Exits 1 naming each bad shard.")
    v.add_argument("dir", metavar="DIR", help="a shard directory made by `prepare`")
    v.add_argument("--tokenizer", metavar="TOK", help="also check that this tokenizer made the shards")
    v.add_argument("--no-checksums", action="store_true", help="skip sha256 (faster on huge datasets)")

    i = sub.add_parser("inspect", help="summarise a shard directory and decode a few samples",
                       description="Print totals, tokenizer, per-shard counts and the first few documents decoded.")
    i.add_argument("dir", metavar="DIR", help="a shard directory made by `prepare`")
    i.add_argument("--tokenizer", metavar="TOK", help="tokenizer to decode with (default: the manifest's, if present)")
    i.add_argument("--samples", type=int, default=3, help="how many documents to show (default: 3)")
    return p


def _train_tokenizer(args) -> int:
    from data_pipeline.sources import SkipCounter, expand_inputs, iter_documents
    from data_pipeline.tokenizer import train_bpe

    files = expand_inputs(args.input)
    skip = SkipCounter() if args.skip_bad else None
    texts = (d.text for d in iter_documents(files, args.text_key, skip))
    tok = train_bpe(texts, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"wrote {args.out}/tokenizer.json: vocab {tok.vocab_size}, bos {tok.bos_id} eos {tok.eos_id} "
          f"pad {tok.pad_id}, hash {tok.identity[:12]}")
    if skip is not None:
        print(skip.summary())
    return 0


def _prepare(args) -> int:
    from data_pipeline.prepare import prepare

    r = prepare(args.input, args.tokenizer, args.out, text_key=args.text_key, shard_size_mb=args.shard_size_mb,
                workers=args.workers, overwrite=args.overwrite, skip_bad=args.skip_bad,
                progress=not args.no_progress, command=["pretrain-data", *sys.argv[1:]])
    m = r.manifest
    print(f"wrote {len(m.shards)} shards to {args.out}: {m.total_samples:,} documents, {m.total_tokens:,} tokens, "
          f"{r.seconds:.1f} s ({r.tokens_per_s:,.0f} tokens/s)")
    if r.skipped is not None:
        print(r.skipped.summary())
    return 0


def _verify(args) -> int:
    from data_pipeline.tokenizer import load_tokenizer
    from data_pipeline.verify import verify_shards

    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    r = verify_shards(args.dir, tok, checksums=not args.no_checksums)
    for note in r.notes:
        print(f"note: {note}")
    for problem in r.problems:
        print(f"BAD {problem}", file=sys.stderr)
    total = len(r.manifest.shards)
    if r.ok:
        print(f"OK {args.dir}: {total} shards, {r.manifest.total_samples:,} documents, "
              f"{r.manifest.total_tokens:,} tokens" + (", checksums verified" if not args.no_checksums else ""))
        return 0
    print(f"FAILED {args.dir}: {len(r.problems)} problem(s), {r.shards_ok}/{total} shards ok", file=sys.stderr)
    return EXIT_BAD_INPUT


def _inspect(args) -> int:
    from data_pipeline.inspect_shards import describe

    print(describe(args.dir, args.tokenizer, samples=args.samples))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run = {"train-tokenizer": _train_tokenizer, "prepare": _prepare, "verify": _verify, "inspect": _inspect}
    try:
        return run[args.command](args)
    except DataError as e:
        print(f"pretrain-data {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"pretrain-data {args.command}: interrupted (no partial shard was left under a final name)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
