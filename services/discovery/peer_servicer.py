"""The Peer gRPC service (port 5001): checks each request, tells the core who called, answers.

The caller's address is always the connection's source address (context.peer()), never
anything from the message, so no node can place contacts or provider records for an
address it does not own. Over mutual TLS that address must also be one the caller's
certificate names (an IP SAN), and the node ID it sends must be the one its certificate's key
gives (identity.node_id_of_certificate): a node's identity in the DHT is bound to its
certificate, so it can neither speak for another node nor mint IDs. The ports a caller sends
only ever describe the caller itself (its own contact, its own records). Refusals are raised as
errors of services.common.errors; the server's interceptor answers their status.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field

import grpc

from services.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnimplementedError,
)
from services.common.genproto.peermirror.discovery.v1 import peer_pb2 as pb
from services.common.genproto.peermirror.discovery.v1 import peer_pb2_grpc as pb_grpc
from services.common.grpc_server import client_of
from services.common.ratelog import LimitLog
from services.discovery.identity import PeerIdentities, PeerIdentity
from services.discovery.kademlia import Contact, DhtNode, RecordRateExceeded, short_id
from services.discovery.lease_rpc import LeaseAuthority
from services.discovery.peer_client import PeerServiceClient
from services.discovery.wire import (
    check_id_field,
    check_keys,
    contact_to_proto,
    duration,
    normalize_ip,
    peer_ip,
    seconds,
    sender_contact,
)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Peer"].full_name

Context = grpc.aio.ServicerContext[object, object]


@dataclass(eq=False)
class PeerServicer(pb_grpc.PeerServicer):
    """Answers other nodes from the DhtNode's state."""

    node: DhtNode
    client: PeerServiceClient
    me: Callable[[], pb.SenderInfo]
    clock: Callable[[], float]
    _: KW_ONLY
    # Set when the server requires client certificates (tls.enabled).
    bind_identity: bool = False
    limit_log: LimitLog = field(default_factory=lambda: LimitLog(__name__))
    leases: LeaseAuthority | None = None
    identities: PeerIdentities = field(default_factory=PeerIdentities, init=False)
    requests: int = field(default=0, init=False)
    refused_identity: int = field(default=0, init=False)

    def _caller(self, has_sender: bool, sender: pb.SenderInfo, context: Context) -> Contact:
        """The caller as a contact; raises when it is not acceptable."""
        address = peer_ip(context.peer())
        if address is None:
            raise FailedPreconditionError(
                "the Peer service only accepts TCP callers with an IP address"
            )
        identity = self._check_identity(address, context) if self.bind_identity else None
        caller = sender_contact(has_sender, sender, address)
        if identity is not None and caller.node_id != identity.node_id:
            self.refused_identity += 1
            self.limit_log.refused(
                "identity_node_id",
                address,
                "peer refused: it claims a node ID its certificate does not give it",
                claimed=short_id(caller.node_id),
                certificate_node_id=short_id(identity.node_id),
            )
            raise PermissionDeniedError(
                f"the caller's certificate gives it node ID "
                f"{identity.node_id.hex()}, not {caller.node_id.hex()}",
                field="sender.node_id",
            )
        return caller

    def _check_identity(self, address: str, context: Context) -> PeerIdentity:
        """The caller's verified identity; raises unless its certificate names the address
        it calls from."""
        identity = self.identities.of(context.auth_context())
        if identity is None:
            self.refused_identity += 1
            raise UnauthenticatedError("a client certificate of the cluster CA is required")
        named = identity.ips
        if address not in {normalize_ip(ip) for ip in named}:
            self.refused_identity += 1
            self.limit_log.refused(
                "identity_binding",
                address,
                "peer refused: its certificate does not name the address it calls from",
                certificate_ips=named,
            )
            raise PermissionDeniedError(
                f"the caller's certificate names {named or 'no IP address'}, "
                f"not the address {address} it calls from"
            )
        return identity

    def _check_batch(self, keys: Sequence[bytes], context: Context) -> None:
        """An AddProvider/RemoveProvider batch; one over discovery.max_keys_per_peer_call is
        also logged (rate limited) before it is refused like any malformed batch."""
        limit = self.node.config.max_batch_keys
        if len(keys) > limit:
            self.limit_log.refused(
                "max_keys_per_peer_call",
                client_of(context.peer()),
                "peer refused: too many keys in one call",
                max=limit,
                keys=len(keys),
            )
        check_keys(keys, limit)

    def _heard(self, caller: Contact) -> None:
        # Only once the whole request was found well-formed.
        self.requests += 1
        self.client.heard_from(caller)

    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        caller = self._caller(request.HasField("sender"), request.sender, context)
        self._heard(caller)
        return pb.PingResponse(responder=self.me(), observed_address=caller.address)

    async def FindNode(self, request: pb.FindNodeRequest, context: Context) -> pb.FindNodeResponse:
        caller = self._caller(request.HasField("sender"), request.sender, context)
        check_id_field(request.target, "target")
        self._heard(caller)
        closest = self.node.find_node(caller.node_id, request.target)
        return pb.FindNodeResponse(closest=[contact_to_proto(c) for c in closest])

    async def GetProviders(
        self, request: pb.GetProvidersRequest, context: Context
    ) -> pb.GetProvidersResponse:
        caller = self._caller(request.HasField("sender"), request.sender, context)
        check_id_field(request.key, "key")
        self._heard(caller)
        now = self.clock()
        records, closer = self.node.get_providers(caller.node_id, request.key, request.limit, now)
        return pb.GetProvidersResponse(
            providers=[
                pb.Provider(node=contact_to_proto(r.provider), ttl=duration(r.ttl(now)))
                for r in records
                if r.provider.node_id != caller.node_id
            ],
            closer=[contact_to_proto(c) for c in closer],
        )

    async def AddProvider(
        self, request: pb.AddProviderRequest, context: Context
    ) -> pb.AddProviderResponse:
        caller = self._caller(request.HasField("sender"), request.sender, context)
        self._check_batch(request.keys, context)
        ttl = seconds(request.ttl) if request.HasField("ttl") else 0.0
        if ttl < 0:
            raise InvalidArgumentError("must not be negative", field="ttl")
        self._heard(caller)
        try:
            stored, applied = self.node.add_provider(caller, request.keys, ttl, self.clock())
        except RecordRateExceeded as exc:
            self.limit_log.refused(
                "peer_records_per_second",
                caller.address,
                "peer refused: too many provider records per second",
                max=exc.rate,
                keys=len(request.keys),
            )
            raise ResourceExhaustedError(
                f"this node takes at most {exc.rate:g} records per second from one peer "
                f"(discovery.peer_records_per_second); retry in {exc.retry_after:.1f} s",
                field="keys",
            ) from None
        return pb.AddProviderResponse(stored=stored, ttl=duration(applied))

    async def RemoveProvider(
        self, request: pb.RemoveProviderRequest, context: Context
    ) -> pb.RemoveProviderResponse:
        caller = self._caller(request.HasField("sender"), request.sender, context)
        self._check_batch(request.keys, context)
        self._heard(caller)
        return pb.RemoveProviderResponse(removed=self.node.remove_provider(caller, request.keys))

    # -- fetch leases (the rules are in lease_rpc and kademlia.leases) -----------------------

    def _lease_caller(
        self, request: pb.PeerLeaseRequest | pb.PeerLeaseKey, context: Context
    ) -> tuple[Contact, LeaseAuthority]:
        caller = self._caller(request.HasField("sender"), request.sender, context)
        check_id_field(request.key, "key")
        if self.leases is None:
            raise UnimplementedError("this node keeps no fetch leases")
        self._heard(caller)
        return caller, self.leases

    async def AcquireLease(
        self, request: pb.PeerLeaseRequest, context: Context
    ) -> pb.PeerLeaseState:
        caller, leases = self._lease_caller(request, context)
        return leases.acquire_state(caller, request)

    async def RenewLease(self, request: pb.PeerLeaseRequest, context: Context) -> pb.PeerLeaseState:
        caller, leases = self._lease_caller(request, context)
        return leases.renew_state(caller, request)

    async def ReleaseLease(
        self, request: pb.PeerLeaseKey, context: Context
    ) -> pb.PeerLeaseReleased:
        caller, leases = self._lease_caller(request, context)
        return leases.release_state(caller, request.key)

    async def GetLease(self, request: pb.PeerLeaseKey, context: Context) -> pb.PeerLeaseState:
        caller, leases = self._lease_caller(request, context)
        return leases.get_state(caller, request.key)
