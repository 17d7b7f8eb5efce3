"""`python -m decovae_fast.cli ...`: the `decovae` command."""
import sys

from decovae_fast.cli.main import main

sys.exit(main())
