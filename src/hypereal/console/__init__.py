"""The web console: static files (HTML, ES modules, CSS) served by the app at ``/console``."""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
