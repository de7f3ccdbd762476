"""``python -m cl_tokens.testing serve``: a standalone fake Commerce Layer token server."""

import sys

from ._serve import main

sys.exit(main())
