"""``python -m ddsnap_bench`` (with ``bench/`` on the path): the same as ``bench/run``
without its setup step."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
