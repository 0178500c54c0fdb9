"""Re-check a directory against its manifest.json: `python -m checkpoints_tools.manifest DIR`.

Reports every file that is missing, changed (size or sha256) or not listed; exit status 0 when
there is none, 1 otherwise. The manifests themselves: megatron_opd.models.hf.manifest.
"""

from __future__ import annotations

import argparse
import sys

from megatron_opd.models.hf.manifest import verify_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_tools.manifest", description=__doc__)
    parser.add_argument("directory", help="an output directory of checkpoints_tools")
    args = parser.parse_args(argv)
    problems = verify_manifest(args.directory)
    for p in problems:
        print(p, file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
