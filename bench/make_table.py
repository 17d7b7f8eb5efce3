"""Turn a benchmark result file into the README's markdown table.

    python bench/make_table.py bench/results/<device>.json [-o bench/results/README_table.md]

The table ends with the command that reproduces the file (decovae bench ...).
"""
from __future__ import annotations

import argparse
import json
import sys

from decovae_fast.benchmark.harness import validate
from decovae_fast.benchmark.table import format_table
from decovae_fast.io.outputs import write_text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", help="bench/results/<device>.json written by `decovae bench --json`")
    p.add_argument("-o", "--out", help="write the markdown here as well as to stdout")
    args = p.parse_args(argv)
    try:
        with open(args.result) as f:
            result = json.load(f)
        validate(result)
    except (OSError, ValueError) as exc:
        print(f"make_table: {args.result}: {exc}", file=sys.stderr)
        return 2
    table = format_table(result, args.result)
    if args.out:
        write_text(args.out, table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
