"""Accounting: every span sent is received, or counted as dropped — matched by span id.

``sent`` are the span ids the system under test accepted (its receiver
answered OK), ``received`` the ids a backend sink recorded, ``drops`` the
counters the system under test reports for spans it took and did not
deliver. The books balance when no id arrives that was never sent and
``len(sent - received) == sum(drops)``: anything else is a span lost (or
double-counted) without a word.

Example
-------
>>> a = account({b"a", b"b", b"c"}, {b"a", b"b"}, {"queue_full": 1})
>>> a.balanced, a.missing, a.unaccounted
(True, 1, 0)
>>> account({b"a", b"b"}, {b"a"}, {}).unaccounted
1
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["Accounting", "account"]


@dataclass(frozen=True)
class Accounting:
    """The books of one run (all counts are spans)."""

    sent: int
    received: int
    missing: int
    unexpected: int
    counted_drops: int
    drops: dict = field(default_factory=dict)

    @property
    def unaccounted(self) -> int:
        """Spans neither received nor counted (negative: counted more drops than missing)."""
        return self.missing - self.counted_drops

    @property
    def balanced(self) -> bool:
        return self.unexpected == 0 and self.unaccounted == 0

    def summary(self) -> str:
        return (f"sent {self.sent}, received {self.received}, missing {self.missing}, "
                f"counted drops {self.counted_drops} {self.drops or ''}, unexpected "
                f"{self.unexpected}, unaccounted {self.unaccounted}")


def account(sent: Iterable[bytes], received: Iterable[bytes],
            drops: Mapping[str, int]) -> Accounting:
    """Balance span ids ``sent`` against ids ``received`` and counted ``drops`` by reason.

    Parameters
    ----------
    sent, received : iterables of span ids (duplicates in ``received`` are ignored)
    drops : mapping reason -> spans counted as not delivered
    """
    sent_set, recv_set = set(sent), set(received)
    counted = sum(int(v) for v in drops.values())
    return Accounting(sent=len(sent_set), received=len(recv_set & sent_set),
                      missing=len(sent_set - recv_set), unexpected=len(recv_set - sent_set),
                      counted_drops=counted, drops={k: int(v) for k, v in drops.items() if v})
