"""`python -m megatron_opd.serving ...`: the server's command line (serving/cli.py)."""

import os
import sys

from megatron_opd.serving.cli import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Nothing is left to write; skip the interpreter's teardown of torch and megatron (about 1 s).
    os._exit(code)
