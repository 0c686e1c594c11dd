"""``python -m tfrs_coldstart.serving.devserver``: ``tfrs-coldstart serve`` without the CLI.

Errors are not turned into one ``error:`` line here; ``tfrs-coldstart serve`` does that.
"""

import sys

from tfrs_coldstart.serving.devserver.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
