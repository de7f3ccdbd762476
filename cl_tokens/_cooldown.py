"""Fail fast after the credentials were rejected: for ``auth_failure_cooldown`` seconds
a key's callers get the same ``AuthenticationError`` without a request, so a service
with a wrong secret does not spend the endpoint's 30 requests a minute on 401s."""

from __future__ import annotations

from ._clock import Clock
from ._errors import AuthenticationError
from ._tuning import Tuning

__all__ = ["Cooldowns"]


class Cooldowns(dict[str, tuple[float, AuthenticationError]]):
    """The rejected keys, each with its monotonic end and the rejection (a dict)."""

    def __init__(self, tuning: Tuning, clock: Clock) -> None:
        super().__init__()
        self._tuning = tuning
        self._clock = clock

    def enter(self, key: str, error: AuthenticationError) -> None:
        self[key] = (self._clock.monotonic() + self._tuning.auth_failure_cooldown, error)

    def raise_if_cooling_down(self, key: str) -> None:
        cooling = self.get(key)
        if cooling is None:
            return
        until, error = cooling
        if self._clock.monotonic() >= until:
            del self[key]
            return
        raise AuthenticationError(
            f"{error} (failing fast: the credentials were rejected "
            f"{self._tuning.auth_failure_cooldown:g} s ago or less)",
            status=error.status,
            code=error.code,
            title=error.title,
            detail=error.detail,
        )

    def forget_ended(self, mono: float) -> None:
        for key in [k for k, (until, _) in self.items() if mono >= until]:
            del self[key]
