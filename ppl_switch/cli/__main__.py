"""``python -m ppl_switch.cli``: the same as the ``ppl-switch`` command."""

import sys

from ppl_switch.cli import main

sys.exit(main())
