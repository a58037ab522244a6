"""``python -m tcpclose``: the same as the ``tcpclose`` command."""

import sys

from ._cli import main

sys.exit(main())
