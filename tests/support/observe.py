"""A recorder of the progress a backend reports, for tests that drive a backend against a
fake (wait for a fake's state with ``tests.support.polling.eventually``)."""

from __future__ import annotations


class ProgressRecorder:
    """A ``ProgressCallback`` that keeps every ``(fraction, message)`` it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    async def __call__(self, fraction: float, message: str) -> None:
        self.calls.append((fraction, message))

    @property
    def messages(self) -> list[str]:
        """The messages, in order."""
        return [message for _, message in self.calls]

    @property
    def fractions(self) -> list[float]:
        """The fractions, in order."""
        return [fraction for fraction, _ in self.calls]
