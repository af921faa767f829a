"""What tests share: fake upstream providers speaking each provider's documented protocol
(``*_server.py``, served with ``servers.serve_app``), scripted chat and job backends
(``chat_backends.py``, ``jobs.py``: the app with its engine on a temporary SQLite file),
sample media, real processes and services (``processes.py``, ``infra.py``), the progress
recorder (``observe.py``) and the one polling helper (``polling.eventually``)."""
