"""Ray job entry point: `ray job submit --working-dir . -- python pipelines/train.py ...`.

Takes the same arguments as `mtrec train` and prints the same final JSON line. Inside a
job `$RAY_ADDRESS` is set, so training runs under Ray Train on that cluster
(`--workers N`, default 1); give `--out` as an absolute path, since the job runs in an
unpacked copy of the working directory.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the job's working dir

from mtrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
