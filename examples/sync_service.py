"""A sync grpc.server service protected by authmesh.

Run it against a stack (``authmesh up --env-file authmesh.env``)::

    set -a; . ./authmesh.env; set +a
    python examples/sync_service.py 127.0.0.1:50072

``with guard:`` runs the guard's event loop in a thread of its own: handlers stay plain functions, and
what needs I/O (a key refetch, ``Introspect`` while the revocation state is stale) is handed to that
loop with a deadline, so no call ever hangs.
"""

import signal
import sys
import threading
from concurrent import futures

import grpc

from authmesh import AUTHENTICATED, ResourceGuard, ScopeRequirement, current_claims
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc

SERVICE = "/authmesh.resource.v1.ResourceService"
POLICY = {
    f"{SERVICE}/WhoAmI": AUTHENTICATED,
    f"{SERVICE}/GetDocument": ScopeRequirement(any_of={"docs:read", "docs:admin"}),
}


class Documents(resource_pb2_grpc.ResourceServiceServicer):
    def WhoAmI(self, request, context):  # gRPC method names are CamelCase
        claims = current_claims()
        return resource_pb2.WhoAmIResponse(subject=claims.sub, scopes=claims.scopes, session_id=claims.sid)

    def GetDocument(self, request, context):
        return resource_pb2.Document(id=request.id, owner=current_claims().sub, body="hello from sync")


def main(listen: str) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with ResourceGuard.from_env() as guard:  # waits until the revocation state has caught up
        interceptor = guard.sync_interceptor(POLICY)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[interceptor])
        resource_pb2_grpc.add_ResourceServiceServicer_to_server(Documents(), server)
        server.add_insecure_port(listen)
        server.start()
        print(f"serving on {listen}", flush=True)
        stop.wait()
        server.stop(grace=2).wait()


if __name__ == "__main__":
    main(sys.argv[1])
