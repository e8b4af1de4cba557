"""``python -m beam_influence.cli``: the ``beam-influence`` command."""
import sys

from beam_influence.cli import main

sys.exit(main())
