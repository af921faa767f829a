"""HTTP layer: thin FastAPI routers; every rule they apply lives in ``domain``."""
