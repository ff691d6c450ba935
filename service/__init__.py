"""evomerge's service: settings, database, study controller, REST API, dashboard, CLI.

Importing this package imports no torch, ray or lm_eval: the API process runs without
a GPU and heavy imports stay in the modules that use them.
"""

from search_spaces.version import __version__

__all__ = ["__version__"]
