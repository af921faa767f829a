"""Identifiers handed to clients (``job_...``, ``res_...``): defined in the lowest layer,
``store/ids.py``, so that media keys below the domain use the same ids."""

from __future__ import annotations

from hypereal.store.ids import as_utc as as_utc
from hypereal.store.ids import new_id as new_id
