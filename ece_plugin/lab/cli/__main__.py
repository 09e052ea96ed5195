"""``python -m ece_plugin.lab.cli``: the same as ``ece-plugin``."""

import sys

from . import main

sys.exit(main())
