"""One router per resource; mounted under both ``/v1`` and ``/api/v1``."""
