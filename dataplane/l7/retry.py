"""When a request may be sent to a backend again: pure decisions, table-tested.

RFC 9110 9.2.2: a request whose method is not idempotent is never resent automatically
once any of it may have reached a backend. Every resend counts against the rule's
`retry.attempts`; a rule without retries still gets one resend of an idempotent request
whose pooled connection turned out closed before any byte of an answer (the connection
went stale, the backend did not fail), and that resend is on a new connection.
"""

from __future__ import annotations

from enum import Enum


class Failure(Enum):
    CONNECT = "connect"  # no connection was made: nothing was sent
    RESET = "reset"  # the connection closed or reset before any byte of a response
    STATUS = "status"  # the backend answered with a status the rule retries
    TIMEOUT = "timeout"  # no response within timeouts.backendRequest (504 in retry.codes)
    # The backend said it did not process the request (HTTP/2 REFUSED_STREAM, or a stream
    # above a GOAWAY's last stream id): nothing happened, so any method may go again.
    REFUSED = "refused"
    # A gRPC call answered with a grpc-status the rule lists (retry.grpcCodes): the service
    # owner says that status is safe to retry, whatever the method (every call is a POST).
    GRPC_STATUS = "grpc_status"


def may_resend(
    failure: Failure,
    *,
    idempotent: bool,
    reused: bool,
    resent: int,
    attempts: int,
    replayable: bool,
    response_started: bool,
    budget: bool,
) -> bool:
    """Whether to send the request again.

    resent: resends so far; attempts: the rule's retry.attempts; replayable: every body byte
    read so far is still held; response_started: the client has seen part of a response;
    budget: the cluster's retry budget has room.
    """
    if response_started or not replayable:
        return False
    if failure is Failure.CONNECT:
        return resent < attempts and budget
    if failure is Failure.GRPC_STATUS:
        return resent < attempts and budget
    if failure is Failure.REFUSED:
        # As a stale connection: one resend even without retries, and no budget needed (the
        # backend is draining or full, not failing).
        return resent == 0 or (resent < attempts and budget)
    if not idempotent:
        return False
    if failure is Failure.RESET and reused and resent == 0 and attempts == 0:
        return True
    return resent < attempts and budget


def give_up_status(failure: Failure) -> int:
    """What the client gets when a failure is not resent (STATUS forwards the backend's)."""
    if failure is Failure.TIMEOUT:
        return 504
    return 503  # as Envoy answers "connect error or disconnect/reset before headers"
