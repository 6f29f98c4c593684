"""Allow ``python -m relaymilter``."""

import sys

from relaymilter.cli import main

sys.exit(main())
