"""Local lm-eval tasks for the tests (no hub is reachable): a multiple-choice task and a rolling-loglikelihood
one, as lm-eval YAML with `dataset_path: json` and local `data_files`, built from the tests' word list."""
from __future__ import annotations

import json
import random
from pathlib import Path

from train_common import WORDS

MC, TEXT, GEN = "tiny_mc", "tiny_text", "tiny_gen"


def write_tasks(root: Path, *, docs: int = 12, missing_data: bool = False) -> Path:
    """root/<task>.yaml + their data; `missing_data`: a third task, `tiny_gone`, whose data file is not there."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    with open(root / "mc.jsonl", "w") as f:
        for i in range(docs):
            query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
            choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) + "." for _ in range(3)]
            f.write(json.dumps({"query": query, "choices": choices, "gold": i % 3}) + "\n")
    with open(root / "text.jsonl", "w") as f:
        for _ in range(4):  # longer than the tests' 32-token context: several rolling windows each
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 90))) + "."}) + "\n")
    (root / f"{MC}.yaml").write_text(_task(MC, root / "mc.jsonl", "multiple_choice", "{{query}}",
                                           'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"',
                                           ["acc", "acc_norm"]))
    (root / f"{TEXT}.yaml").write_text(_task(TEXT, root / "text.jsonl", "loglikelihood_rolling", "",
                                             'doc_to_target: "{{text}}"',
                                             ["word_perplexity", "byte_perplexity", "bits_per_byte"]))
    (root / f"{GEN}.yaml").write_text(_task(GEN, root / "mc.jsonl", "generate_until", "{{query}}",
                                            'doc_to_target: "{{choices[gold]}}"\ngeneration_kwargs:\n'
                                            '  until: ["."]\n  max_gen_toks: 8\n  do_sample: false',
                                            ["exact_match"]))
    if missing_data:
        (root / "tiny_gone.yaml").write_text(_task("tiny_gone", root / "not_fetched.jsonl", "multiple_choice",
                                                   "{{query}}", 'doc_to_choice: "{{choices}}"\n'
                                                   'doc_to_target: "{{gold}}"', ["acc"]))
    return root


def _task(name: str, data: Path, output_type: str, text: str, target: str, metrics: list[str]) -> str:
    listed = "\n".join(f"  - metric: {m}" for m in metrics)
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            f"output_type: {output_type}\ndoc_to_text: \"{text}\"\n{target}\nmetric_list:\n{listed}\n")
