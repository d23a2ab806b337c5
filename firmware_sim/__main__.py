"""``python -m firmware_sim``: the same as the ``smartx-sim`` command."""

import sys

from firmware_sim.cli import main

sys.exit(main())
