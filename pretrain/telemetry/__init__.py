"""What a run reports: per-step metrics (metrics.jsonl, MFU), MLflow tracking off the training thread, and the
model registry (a finished checkpoint exported and registered). Torch-free at import."""
