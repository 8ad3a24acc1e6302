"""``python -m streams``: see streams.cli."""

import sys

from streams.cli import main

if __name__ == "__main__":
    sys.exit(main())
