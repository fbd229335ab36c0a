"""Downstream evaluation with lm-evaluation-harness: `pretrain eval` on any checkpoint and layout, and `eval.tasks`
inside the training loop. lm-eval is an optional extra (`pip install 'llama-pretrain[eval]'`); nothing here is
imported unless one of the two is used."""
