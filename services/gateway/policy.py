"""What the gateway does when a worker fails one attempt of a request: a pure policy.

- Nothing sent to the client yet: start over on other workers (the failed one excluded), up to
  `prefill_retries` times, whichever side failed.
- Tokens already sent and the decode worker failed: with `--migrate`, resume on another pair of
  workers from prompt + tokens sent (seeded sampling continues its random stream), up to
  `migrate_retries` times. A migration's own prefill may fail too (its worker may have been
  writing to the dead decode worker when it died): that is another migration, not the end.
- Otherwise the request fails with the worker's status.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Next(enum.Enum):
    RETRY = "retry"      # start over elsewhere: nothing was sent
    MIGRATE = "migrate"  # go on elsewhere from the tokens sent
    FAIL = "fail"        # answer the client with the failure


@dataclass
class RetryBudget:
    retries: int
    migrations: int

    @classmethod
    def of(cls, prefill_retries: int, migrate: bool, migrate_retries: int) -> RetryBudget:
        return cls(prefill_retries, migrate_retries if migrate else 0)

    def after(self, tokens_sent: int) -> Next:
        """What to do after a worker failed an attempt, with `tokens_sent` sent so far."""
        if tokens_sent == 0 and self.retries > 0:
            self.retries -= 1
            return Next.RETRY
        if tokens_sent > 0 and self.migrations > 0:  # a prefill fails after tokens only when
            # it was a migration's
            self.migrations -= 1
            return Next.MIGRATE
        return Next.FAIL
