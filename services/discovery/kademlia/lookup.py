"""Iterative Kademlia lookup as a pure state machine: the caller does the RPCs.

Usage: seed it with the closest contacts known, then loop: send `next_queries()` (never
more than alpha in flight), feed each answer to `on_response` or `on_failure`, until
`done`. A node lookup ends when the k closest contacts seen that did not fail have all
answered; that rule also covers "a round brought nothing closer" (the remaining
unqueried of the k closest get asked) and "everyone failed" (nothing is left to ask).
A provider lookup also ends once `provider_limit` providers are known; each
`on_response` returns the providers it revealed first, so they can be streamed at once.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable
from dataclasses import dataclass

from services.discovery.kademlia.contact import Contact
from services.discovery.kademlia.node_id import check_id, id_int
from services.discovery.kademlia.routing_table import DEFAULT_K

DEFAULT_ALPHA = 3


class QueryState(enum.Enum):
    """Where one candidate of a lookup stands."""

    WAITING = "waiting"
    IN_FLIGHT = "in_flight"
    RESPONDED = "responded"
    FAILED = "failed"


@dataclass(slots=True)
class _Candidate:
    contact: Contact
    distance: int
    # Length of the query chain that reaches this contact: seeds are hop 1, a contact
    # learned from a hop-h answer is hop h+1.
    hop: int
    state: QueryState = QueryState.WAITING


class Lookup:
    """One iterative lookup of `target` (a node ID or a DHT key)."""

    def __init__(
        self,
        target: bytes,
        seeds: Iterable[Contact],
        *,
        k: int = DEFAULT_K,
        alpha: int = DEFAULT_ALPHA,
        self_id: bytes | None = None,
        find_providers: bool = False,
        provider_limit: int | None = None,
    ) -> None:
        """`self_id` (the node running the lookup) is never queried nor returned as a
        provider. `provider_limit` (provider lookups only) stops the lookup early."""
        if k < 1 or alpha < 1:
            raise ValueError("k and alpha must be at least 1")
        if provider_limit is not None and provider_limit < 1:
            raise ValueError("provider_limit must be at least 1")
        self.target = check_id(target)
        self.k = k
        self.alpha = alpha
        self.self_id = self_id
        self.find_providers = find_providers
        self.provider_limit = provider_limit if find_providers else None
        self._t = id_int(target)
        self._order: list[_Candidate] = []  # by distance to target, closest first
        self._by_id: dict[bytes, _Candidate] = {}
        self._in_flight = 0
        self._providers: dict[bytes, Contact] = {}
        self._first_provider_hop: int | None = None
        self.queries_sent = 0
        for contact in seeds:
            self._learn(contact, hop=1)

    # -- driving ----------------------------------------------------------------------

    def next_queries(self) -> list[Contact]:
        """Contacts to query now (marked in flight); empty when enough are in flight or
        nothing is left to ask."""
        if self.done:
            return []
        budget = self.alpha - self._in_flight
        picked: list[Contact] = []
        live = 0
        for cand in self._order:
            if budget <= 0 or live >= self.k:
                break
            if cand.state is QueryState.FAILED:
                continue
            live += 1
            if cand.state is QueryState.WAITING:
                cand.state = QueryState.IN_FLIGHT
                picked.append(cand.contact)
                budget -= 1
        self._in_flight += len(picked)
        self.queries_sent += len(picked)
        return picked

    def on_response(
        self,
        contact: Contact,
        closer: Iterable[Contact],
        providers: Iterable[Contact] = (),
    ) -> list[Contact]:
        """Records an answer; returns the providers it revealed that were not known yet.
        Answers from contacts this lookup did not query are ignored."""
        cand = self._by_id.get(contact.node_id)
        if cand is None or cand.state is not QueryState.IN_FLIGHT:
            return []
        cand.state = QueryState.RESPONDED
        self._in_flight -= 1
        by_id = self._by_id
        hop = cand.hop + 1
        for other in closer:
            known = by_id.get(other.node_id)
            if known is None:
                self._learn(other, hop)
            elif known.state is QueryState.WAITING and hop < known.hop:
                known.hop = hop
        if not self.find_providers:
            return []
        fresh: list[Contact] = []
        for provider in providers:
            if provider.node_id == self.self_id or provider.node_id in self._providers:
                continue
            if self.provider_limit is not None and len(self._providers) >= self.provider_limit:
                break
            self._providers[provider.node_id] = provider
            fresh.append(provider)
        if fresh and self._first_provider_hop is None:
            self._first_provider_hop = cand.hop
        return fresh

    def on_failure(self, contact: Contact) -> None:
        """Records that a query failed (error, timeout, refused)."""
        cand = self._by_id.get(contact.node_id)
        if cand is None or cand.state is not QueryState.IN_FLIGHT:
            return
        cand.state = QueryState.FAILED
        self._in_flight -= 1

    # -- state ------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the k closest non-failed candidates have all answered (or the
        provider limit is reached)."""
        if self.provider_limit is not None and len(self._providers) >= self.provider_limit:
            return True
        live = 0
        for cand in self._order:
            if cand.state is QueryState.FAILED:
                continue
            if cand.state is not QueryState.RESPONDED:
                return False
            live += 1
            if live >= self.k:
                break
        return True

    @property
    def in_flight(self) -> int:
        """Queries sent and not yet answered or failed."""
        return self._in_flight

    def result(self) -> list[Contact]:
        """The k closest contacts that answered, closest first."""
        return [c.contact for c in self._closest_responded()]

    @property
    def providers(self) -> list[Contact]:
        """Every distinct provider found so far, in discovery order."""
        return list(self._providers.values())

    @property
    def hops(self) -> int:
        """Length of the query chain that produced the result: for a provider lookup that
        found one, the hop of the first answer naming a provider; otherwise the longest
        chain among the k closest that answered (0 when none did)."""
        if self._first_provider_hop is not None:
            return self._first_provider_hop
        return max((c.hop for c in self._closest_responded()), default=0)

    def state_of(self, node_id: bytes) -> QueryState | None:
        """State of one candidate (None when never seen)."""
        cand = self._by_id.get(node_id)
        return cand.state if cand else None

    # -- internals --------------------------------------------------------------------

    def _learn(self, contact: Contact, hop: int) -> None:
        if contact.node_id == self.self_id:
            return
        known = self._by_id.get(contact.node_id)
        if known is not None:
            if known.state is QueryState.WAITING and hop < known.hop:
                known.hop = hop
            return
        cand = _Candidate(contact, contact.key ^ self._t, hop)
        self._by_id[contact.node_id] = cand
        bisect.insort(self._order, cand, key=lambda c: c.distance)

    def _closest_responded(self) -> list[_Candidate]:
        found: list[_Candidate] = []
        for cand in self._order:
            if cand.state is QueryState.RESPONDED:
                found.append(cand)
                if len(found) >= self.k:
                    break
        return found
