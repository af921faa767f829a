"""The Standard Webhooks signers of the accounts' secrets (``domain/webhook_secrets.py``).

Deliveries read the secret with their claim (one statement, see
:mod:`hypereal.webhooks.delivery`), so whichever process sends an attempt signs it with the
secret current at its claim. Each process keeps the signers it built (:func:`signer`, per
account, with the secret each was built from); a signer built from another secret (one
rotated since) is never used, it is replaced.
"""

from __future__ import annotations

from standardwebhooks import Webhook

# account id -> (secret, its signer), in this process.
_signers: dict[str, tuple[str, Webhook]] = {}
_MAX_SIGNERS = 10_000


def signer(account_id: str, secret: str) -> Webhook:
    """The Standard Webhooks signer of ``secret``, the account's current secret (as read with
    the delivery's claim); built once per secret and process."""
    cached = _signers.get(account_id)
    if cached is not None and cached[0] == secret:
        return cached[1]
    if len(_signers) >= _MAX_SIGNERS:
        _signers.clear()
    made = Webhook(secret)
    _signers[account_id] = (secret, made)
    return made
