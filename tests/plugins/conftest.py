"""Lets the plugin tests import their helper module (plugin_reference) whatever pytest's import mode."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
