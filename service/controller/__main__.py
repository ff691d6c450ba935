"""``python -m service.controller [--database-url URL] [--exit-when-idle]``."""

from service.controller.standalone import main

raise SystemExit(main())
