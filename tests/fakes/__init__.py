"""Fake upstream providers: small real HTTP servers speaking each provider's documented
protocol (serve them with ``tests.support.servers.serve_app``)."""
