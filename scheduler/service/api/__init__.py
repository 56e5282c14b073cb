"""The HTTP side of the service: the FastAPI app, its /v1 routes and answer models, the dashboard (web/)."""
