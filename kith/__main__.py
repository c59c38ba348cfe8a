"""python -m kith"""

import sys

from kith.cli import main

sys.exit(main())
