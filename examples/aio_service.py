"""A grpc.aio service protected by authmesh: the smallest complete one.

Run it against a stack (``authmesh up --env-file authmesh.env``)::

    set -a; . ./authmesh.env; set +a
    python examples/aio_service.py 127.0.0.1:50071

It serves ``authmesh.resource.v1.ResourceService`` (a service of your own works the same way: import its
generated modules and name its methods in the policy).
"""

import asyncio
import signal
import sys

import grpc

from authmesh import AUTHENTICATED, ResourceGuard, ScopeRequirement, current_claims
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc

SERVICE = "/authmesh.resource.v1.ResourceService"
POLICY = {
    f"{SERVICE}/WhoAmI": AUTHENTICATED,
    f"{SERVICE}/GetDocument": ScopeRequirement(all_of={"docs:read"}),
}


class Documents(resource_pb2_grpc.ResourceServiceServicer):
    async def WhoAmI(self, request, context):  # gRPC method names are CamelCase
        claims = current_claims()
        return resource_pb2.WhoAmIResponse(subject=claims.sub, scopes=claims.scopes, session_id=claims.sid)

    async def GetDocument(self, request, context):
        return resource_pb2.Document(id=request.id, owner=current_claims().sub, body="hello from aio")


async def main(listen: str) -> None:
    guard = ResourceGuard.from_env()
    server = grpc.aio.server(interceptors=[guard.aio_interceptor(POLICY)])
    resource_pb2_grpc.add_ResourceServiceServicer_to_server(Documents(), server)
    server.add_insecure_port(listen)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with guard:  # waits until the revocation state has caught up
        await server.start()
        print(f"serving on {listen}", flush=True)
        await stop.wait()
        await server.stop(grace=2)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
