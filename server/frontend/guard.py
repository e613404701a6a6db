"""The authorization guard: every RPC's checks before its handler runs.

For each call: Triton's restricted-protocol header (``--grpc-restricted-protocol``), the
caller's identity (bearer token or client certificate, ``--auth-file``) and role, the models a
limited identity may name, and rate limits; control actions and refusals go to the audit log.
The guard wraps the method handlers once, at start; a handler whose rule asks for nothing
(probes, or everything when no security option is set) is left unwrapped, so a feature that
is off costs nothing. Inference checks the model and the rate per request (streams too)
through :meth:`Guard.admit_inference`, which the inference servicer calls after decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from server.errors import PeregrineError, PermissionDenied, RateLimited, Unauthenticated
from server.frontend.status import refuse
from server.security.audit import AuditLog
from server.security.authenticator import Authenticator
from server.security.identity import ANONYMOUS, Identity, caller, set_caller
from server.security.ratelimit import RateLimiter
from server.security.rules import OPEN, Rule, rule_of, service_roles

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
#: Seconds between checks of the auth file for changes.
AUTH_FILE_POLL_SECS = 2.0

#: The RPC being handled (full method name) and its context: a per-request refusal names
#: the peer in the audit log.
_CALL: ContextVar[tuple[str, grpc.aio.ServicerContext]] = ContextVar("peregrine_call")


class Guard:
    def __init__(
        self,
        authenticator: Authenticator | None = None,
        restrictions: dict[str, tuple[str, str]] | None = None,
        limiter: RateLimiter | None = None,
        audit: AuditLog | None = None,
        refused: Callable[[str], None] | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._restrictions = restrictions or {}
        self._limiter = limiter
        self._audit = audit
        self._count_refused = refused

    @property
    def checks_requests(self) -> bool:
        """Inference requests need a per-request check (model limits, rate limits)."""
        return self._authenticator is not None or self._limiter is not None

    # -- wrapping --------------------------------------------------------------------------

    def wrap(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
             ) -> dict[str, grpc.RpcMethodHandler]:
        return {name: self._wrap(f"/{service}/{name}", handler)
                for name, handler in handlers.items()}

    def _needs(self, rule: Rule) -> bool:
        return bool((rule.roles and (self._authenticator is not None
                                     or self._limiter is not None))
                    or (rule.group is not None and rule.group in self._restrictions)
                    or (rule.audited and self._audit is not None))

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        rule = rule_of(method)
        if not self._needs(rule):
            return handler
        decode, encode = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, rule, handler.unary_unary), decode, encode)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, rule, handler.stream_stream), decode, encode)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, rule, handler.unary_stream), decode, encode)
        raise ValueError(f"{method}: client-streaming RPCs are not guarded")

    def _unary(self, method: str, rule: Rule,
               behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
               ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                identity = self._admit(method, rule, context, request)
            except PeregrineError as exc:
                refuse(context, exc, method)
                return None
            if not rule.audited or self._audit is None:
                return await behaviour(request, context)
            target = _target(request, rule)
            try:
                response = await behaviour(request, context)
            except BaseException:
                self._record(identity, context, method, target, _outcome(context, raised=True))
                raise
            self._record(identity, context, method, target, _outcome(context))
            return response

        return guarded

    def _streaming(self, method: str, rule: Rule,
                   behaviour: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
                   ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[Any]:
            try:
                self._admit(method, rule, context, None)
            except PeregrineError as exc:
                refuse(context, exc, method)
                return
            async for response in behaviour(request, context):
                yield response

        return guarded

    # -- the checks ------------------------------------------------------------------------

    def _admit(self, method: str, rule: Rule, context: grpc.aio.ServicerContext,
               request: Any) -> Identity:
        """The caller's identity, set for the handler; raises the refusal (audited)."""
        identity: Identity | None = None
        try:
            header = self._check_restriction(rule, context)
            if not rule.roles:
                return ANONYMOUS
            identity = self._identify(context, header)
            if not identity.roles & rule.roles:
                raise PermissionDenied(
                    f"identity '{identity.name}' may not call {method}: it needs the role "
                    f"{' or '.join(sorted(r.value for r in rule.roles))}")
            if request is not None and rule.model_field is not None \
                    and identity.models is not None:
                _check_model(identity, _target(request, rule))
            if self._limiter is not None and not rule.inference:
                self._limiter.admit(identity.name)
        except PeregrineError as exc:
            self._refusal(identity, context, method,
                          _target(request, rule) if request is not None else "", exc)
            raise
        set_caller(identity)
        if rule.inference:
            _CALL.set((method, context))
        return identity

    def _check_restriction(self, rule: Rule, context: grpc.aio.ServicerContext) -> str | None:
        """Triton's restricted protocol; returns the authorization header (one metadata scan
        serves both)."""
        wanted = self._restrictions.get(rule.group) if rule.group is not None else None
        header: str | None = None
        found = wanted is None
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION:
                header = value
            elif wanted is not None and key == wanted[0] and value == wanted[1]:
                found = True
        if not found:
            assert wanted is not None
            # Triton's status and words, so its clients recognise the refusal.
            raise _Restricted(f"This protocol is restricted, expecting header '{wanted[0]}'")
        return header

    def _identify(self, context: grpc.aio.ServicerContext, header: str | None) -> Identity:
        authenticator = self._authenticator
        if authenticator is None:
            return ANONYMOUS
        if header is not None:
            identity = authenticator.from_header(header)
            if identity is None:
                raise Unauthenticated("the bearer token is not valid")
            return identity
        if authenticator.uses_certificates:
            identity = authenticator.from_certificate(context.auth_context())
            if identity is not None:
                return identity
        raise Unauthenticated("credentials required: send 'authorization: Bearer <token>' "
                              "metadata or a client certificate the server knows")

    def admit_inference(self, model: str) -> None:
        """One inference request of the current caller to ``model`` (after decoding)."""
        identity = caller()
        try:
            if identity.models is not None:
                _check_model(identity, model)
            if self._limiter is not None:
                self._limiter.admit(identity.name, model)
        except PeregrineError as exc:
            method, context = _CALL.get()
            self._refusal(identity, context, method, model, exc)
            raise

    # -- records ---------------------------------------------------------------------------

    def _refusal(self, identity: Identity | None, context: grpc.aio.ServicerContext,
                 method: str, target: str, exc: PeregrineError) -> None:
        if self._count_refused is not None and not isinstance(exc, RateLimited):
            self._count_refused(exc.code.name)
        self._record(identity, context, method, target, exc.code.name, exc.message)

    def _record(self, identity: Identity | None, context: grpc.aio.ServicerContext,
                method: str, target: str, outcome: str, detail: str = "") -> None:
        if self._audit is None:
            return
        self._audit.record(
            identity=identity.name if identity is not None else "",
            source=identity.source if identity is not None else "none",
            peer=str(context.peer()), rpc=method, target=target, outcome=outcome,
            detail=detail)

    # -- the auth file -----------------------------------------------------------------------

    async def watch_auth_file(self, interval: float = AUTH_FILE_POLL_SECS) -> None:
        """Re-read the auth file when it changes (until cancelled)."""
        authenticator = self._authenticator
        if authenticator is None:
            return
        while True:
            await asyncio.sleep(interval)
            changed = await asyncio.to_thread(authenticator.refresh)
            if changed and self._limiter is not None:
                self._limiter.reset_identities()

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()

    # -- reflection --------------------------------------------------------------------------

    def identity_or_none(self, context: grpc.aio.ServicerContext) -> Identity | None:
        """The caller if its credentials are good, else None (no refusal: for reflection)."""
        if self._authenticator is None:
            return ANONYMOUS
        header = next((v for k, v in context.invocation_metadata() or ()
                       if k == AUTHORIZATION), None)
        with contextlib.suppress(PeregrineError):
            return self._identify(context, header)
        return None


class _Restricted(PeregrineError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "REJECTED"


def _check_model(identity: Identity, model: str) -> None:
    if not model:
        raise PermissionDenied(f"identity '{identity.name}' may use only some models: the "
                               "call must name one")
    if not identity.may_use(model):
        # The same words whether or not the model exists: no oracle of other models.
        raise PermissionDenied(f"identity '{identity.name}' may not use model '{model}'")


def _target(request: Any, rule: Rule) -> str:
    """The model (or region) a call concerns, for the audit log and model limits."""
    field = rule.model_field
    if field is None:
        return str(getattr(request, "name", "")) if rule.audited else ""
    value: Any = request
    for part in field.split(".") if field else ():
        value = getattr(value, part, "")
    return value if isinstance(value, str) else ""


def _outcome(context: grpc.aio.ServicerContext, raised: bool = False) -> str:
    """How an audited call ended: the status its handler set (a refusal sets one and returns),
    else OK, or INTERNAL when the handler raised."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "INTERNAL" if raised else "OK"


class FilteredReflection:
    """Server reflection that lists only the services the caller may call (with an auth file:
    an unauthenticated caller sees the open ones)."""

    def __init__(self, guard: Guard, services: Sequence[str],
                 pool: descriptor_pool.DescriptorPool) -> None:
        self._guard = guard
        self._services = tuple(services)
        self._pool = pool
        self._servicers: dict[tuple[str, ...], ReflectionServicer] = {}

    def _visible(self, identity: Identity | None) -> tuple[str, ...]:
        visible = []
        for service in self._services:
            roles = service_roles(service)
            if roles is OPEN or (roles and identity is not None and identity.roles & roles):
                visible.append(service)
        return tuple(visible)

    async def ServerReflectionInfo(self, request_iterator: Any,
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        names = self._visible(self._guard.identity_or_none(context))
        servicer = self._servicers.get(names)
        if servicer is None:
            servicer = self._servicers[names] = ReflectionServicer(names, pool=self._pool)
        async for response in servicer.ServerReflectionInfo(request_iterator, context):
            yield response

    def add_to(self, server: grpc.aio.Server) -> None:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(self, server)
