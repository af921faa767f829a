"""Operations: Prometheus metrics (``metrics.py``), structured logs with a request id
(``logs.py``) and the one ASGI middleware that times, counts and names every request
(``middleware.py``)."""
