"""`python -m data_pipeline ...` is `pretrain-data ...` without needing the console script installed."""
from data_pipeline.cli import main

raise SystemExit(main())
