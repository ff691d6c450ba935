"""The REST API: routes, response models, auth, the event stream, and an HTTP client.

``service.app.create_app`` assembles the routes; ``service.api.client`` is what the CLI
uses. Nothing here imports torch, ray or lm_eval at import time.
"""
