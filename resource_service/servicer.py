"""``authmesh.resource.v1.ResourceService``: protobuf in and out; authentication is the interceptor's."""

from __future__ import annotations

from typing import Any

import grpc

from authmesh._resource_service.documents import DocumentStore
from authmesh._shared.errors import AuthError, InvalidRequest
from authmesh._shared.grpc_errors import abort_with_error
from authmesh._shared.interceptor import current_claims
from authmesh._shared.scopes import AUTHENTICATED, ScopeRequirement
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc

SERVICE_NAME = resource_pb2.DESCRIPTOR.services_by_name["ResourceService"].full_name
GET_DOCUMENT = f"/{SERVICE_NAME}/GetDocument"
WHO_AM_I = f"/{SERVICE_NAME}/WhoAmI"
# What each method needs beyond a valid token; a method not listed here is refused.
POLICY = {WHO_AM_I: AUTHENTICATED, GET_DOCUMENT: ScopeRequirement(all_of={"docs:read"})}
MAX_DOCUMENT_ID = 128

Context = grpc.aio.ServicerContext[Any, Any]


class ResourceServicer(resource_pb2_grpc.ResourceServiceServicer):
    """The reference protected API.

    Args:
        instance: This replica's name, returned by ``WhoAmI``.
        documents: What ``GetDocument`` serves.
    """

    def __init__(self, instance: str, documents: DocumentStore) -> None:
        self._instance = instance
        self._documents = documents

    async def WhoAmI(  # gRPC method names are CamelCase
        self, request: resource_pb2.WhoAmIRequest, context: Context
    ) -> resource_pb2.WhoAmIResponse:
        """Who the caller's token says it is, and which replica answered."""
        try:
            claims = current_claims()
        except AuthError as error:
            await abort_with_error(context, error)
        return resource_pb2.WhoAmIResponse(
            subject=claims.sub,
            scopes=list(claims.scopes),
            session_id=claims.sid,
            token_id=claims.jti,
            instance=self._instance,
        )

    async def GetDocument(  # gRPC method names are CamelCase
        self, request: resource_pb2.GetDocumentRequest, context: Context
    ) -> resource_pb2.Document:
        """A document (the interceptor has checked scope ``docs:read``)."""
        try:
            current_claims()
            if not request.id or len(request.id) > MAX_DOCUMENT_ID:
                raise InvalidRequest("document id must be 1 to 128 characters", code="FIELD_INVALID")
            document = self._documents.get(request.id)
        except AuthError as error:
            await abort_with_error(context, error)
        return resource_pb2.Document(id=document.id, owner=document.owner, body=document.body)
