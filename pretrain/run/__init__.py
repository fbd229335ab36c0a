"""What a run is, before any model exists: the resolved run (every fact derived once from config, world size and
shard manifests), the distributed environment (ranks and process groups), the names of the files under
`checkpoint.dir` and the exit codes. Torch-free at import, but for `distributed`: dry runs, the planner and the
launcher read the rest."""
