"""The `decovae` command line: main.py wires the command families (codec, encode_dataset, train,
diagnose, bench, info) together; flags.py holds what they share."""
from decovae_fast.errors import UserError  # noqa: F401  (kept: `from decovae_fast.cli import UserError`)
