"""The web dashboard: one page (``/``) of static HTML, CSS and JavaScript, no build step.

Everything it shows comes from the JSON API, called by the browser with the user's bearer
token; the files themselves are public (they hold no data). Routing happens in the page
(``/#/studies/<id>``), so ``/studies/<id>`` stays the JSON API. ``/ui/static/<file>``
serves the assets; only files shipped in ``static/`` can be named.
"""

from __future__ import annotations

from service.dashboard.routes import STATIC_DIR, router

__all__ = ["STATIC_DIR", "router"]
