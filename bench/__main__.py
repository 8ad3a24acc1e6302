"""``python -m bench`` (``make bench``): see bench.run."""

import sys

from bench.run import cli

if __name__ == "__main__":
    sys.exit(cli())
