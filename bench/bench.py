"""Entry point of ``bench/run`` (which installs what the benchmark needs, then runs this
with the project's venv): the benchmark itself is the package ``ddsnap_bench`` next to
this file; ``bench/run --help`` lists the parameters."""

import sys

from ddsnap_bench.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
