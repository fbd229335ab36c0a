"""The training loop (`loop.train`) and what it runs each step: the DeepSpeed engine and LR schedule, the step log,
the held-out evaluation, stop signals, loss-spike detection and rollback, profiling and the test-only fault hooks.

Nothing is imported here: `signals` must be importable before torch (the CLI installs its handlers first)."""
