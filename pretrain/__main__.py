"""`python -m pretrain ...` (what torchrun runs: `torchrun ... -m pretrain train --config ...`)."""
from pretrain.cli import main
from pretrain.libraries import exit_now

exit_now(main())  # without the interpreter's ~1 s teardown of torch and co. (pretrain/libraries.py)
