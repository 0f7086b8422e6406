"""Repository-level pytest configuration.

The flannel-repro plugin itself is loaded through its `pytest11` entry point (pip install -e .), not
from here. This file only enables `pytester` for the plugin's own tests (tests/plugin/), which run
pytest inside pytest.
"""

pytest_plugins = ("pytester",)
