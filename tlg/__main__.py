"""``python -m tlg``: the tlg command line."""
import sys

from tlg.cli import main

sys.exit(main())
