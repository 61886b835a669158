"""Ray job entry point: `ray job submit --working-dir . -- python pipelines/baseline.py ...`.

Takes the same arguments as `mtrec baseline` (the logistic-regression floor, trained in
the job's process) and prints the same final JSON line; give `--out` as an absolute path,
since the job runs in an unpacked copy of the working directory.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the job's working dir

from mtrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["baseline", *sys.argv[1:]]))
