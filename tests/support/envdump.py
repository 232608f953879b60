"""`python -m envdump ARGS` (writing to $DUMP_TO): what a started process sees, for comparing launchers
(tests/runtime/test_warm.py): its environment, argv, path, threads, -W filters and hash seed."""

import json
import os
import sys
import warnings
from pathlib import Path

import torch

if __name__ == "__main__":
    out = Path(os.environ["DUMP_TO"]) / f"rank{os.environ.get('RANK', '-')}.json"
    out.write_text(
        json.dumps(
            {
                "env": dict(os.environ),
                "argv": sys.argv[1:],
                "path0": sys.path[0],
                "cwd": os.getcwd(),
                "threads": torch.get_num_threads(),
                "filters": [
                    (action, category.__name__, str(getattr(module, "pattern", module)))
                    for action, _, category, module, _ in warnings.filters
                    if "dtrain" in str(getattr(module, "pattern", module))
                ],
                "hash": hash("dtrain"),
            }
        )
    )
