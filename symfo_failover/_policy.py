"""`RetryPolicy`: how long and how often to try, carried out by tenacity.

The policy is data; `RetryPolicy.retrying` turns it into a ``tenacity.Retrying`` whose
clock, sleep and randomness are the policy's, so unit tests run it without waiting.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import tenacity


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to try again. The defaults are meant for production.

    - ``deadline``: seconds from the first failure of a call after which the library
      gives up (it tries once more at the deadline). A failover with cluster software
      usually completes well within a minute.
    - ``first_delay`` / ``max_delay``: the wait before the second try, doubled on each
      try up to ``max_delay``. The cap is small on purpose: once the server accepts
      sessions again, the first unit succeeds within about ``max_delay``.
    - ``jitter``: each wait is shortened by a random fraction in ``[0, jitter)`` so that
      many clients do not retry in lock step.
    - ``attempts``: the most tries per call (None: only the deadline counts).
    - ``clock``, ``sleep``, ``random``: injected in tests (a fake clock and a recording
      sleep); production uses ``time.monotonic``, ``time.sleep`` and ``random.random``.
    """

    deadline: float = 60.0
    first_delay: float = 0.02
    max_delay: float = 0.16
    jitter: float = 0.5
    attempts: int | None = None
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("deadline", "first_delay", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"RetryPolicy.{name} must be a finite number >= 0, not {value!r}")
        if self.max_delay < self.first_delay:
            raise ValueError("RetryPolicy.max_delay must not be smaller than first_delay")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"RetryPolicy.jitter must be within [0, 1], not {self.jitter!r}")
        if self.attempts is not None and (
            not isinstance(self.attempts, int) or self.attempts < 1
        ):
            raise ValueError(f"RetryPolicy.attempts must be None or >= 1, not {self.attempts!r}")

    def delay(self, retry_number: int) -> float:
        """The wait before try ``retry_number + 1`` (``retry_number`` >= 1), before capping
        to the deadline. Pure apart from the injected randomness."""
        if retry_number < 1:
            raise ValueError("retry_number starts at 1")
        exponent = min(retry_number - 1, 64)
        base = min(self.max_delay, self.first_delay * (2.0**exponent))
        return base * (1.0 - self.jitter * self.random())

    def retrying(
        self, retry_on: type[BaseException], *, started: float | None = None
    ) -> tenacity.Retrying:
        """A tenacity loop that retries ``retry_on`` within this policy.

        The deadline runs from ``started`` (a reading of ``clock``; default: now). Waits
        never go past it, so the last try happens at the deadline; when it fails
        tenacity raises ``RetryError`` (the caller turns it into its own error).
        """
        start = self.clock() if started is None else started

        def remaining() -> float:
            return self.deadline - (self.clock() - start)

        def wait(state: tenacity.RetryCallState) -> float:
            return max(0.0, min(self.delay(state.attempt_number), remaining()))

        def stop(state: tenacity.RetryCallState) -> bool:
            if self.attempts is not None and state.attempt_number >= self.attempts:
                return True
            return remaining() <= 0

        kwargs: dict[str, Any] = {
            "retry": tenacity.retry_if_exception_type(retry_on),
            "wait": wait,
            "stop": stop,
            "sleep": self.sleep,
            "reraise": False,
        }
        return tenacity.Retrying(**kwargs)

    def elapsed_since(self, start: float) -> float:
        return self.clock() - start


#: The policy used when none is given.
DEFAULT_POLICY = RetryPolicy()
