"""`python -m pretrain ...` (what torchrun runs: `torchrun ... -m pretrain train --config ...`)."""
from pretrain.cli import main

raise SystemExit(main())
