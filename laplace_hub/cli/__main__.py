"""``python -m laplace_hub.cli``."""

import sys

from laplace_hub.cli import main

sys.exit(main())
