"""``python -m dptrain ...``: the CLI. Also the data-parallel entry point:

    torchrun --nproc_per_node N -m dptrain train RECIPE --out DIR

Under torchrun only rank 0 prints results (the other ranks' stdout is discarded; errors still go to stderr).
"""

import os
import sys

from dptrain.cli import main

if __name__ == "__main__":
    if int(os.environ.get("RANK", "0") or 0) > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    sys.exit(main())
