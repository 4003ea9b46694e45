"""Call a protected gRPC service with a token that renews itself (``grpc.aio``).

A worker that asks a resource service who it is, every ``--every`` seconds, as the account in
``AUTHMESH_CLIENT_ACCOUNT``. Its access token is renewed before it expires (and once more if a server
says it has), so the worker runs for as long as its session lives; once the session is revoked the next
call is refused and the worker stops::

    export AUTHMESH_AUTH_TARGET=127.0.0.1:50051 AUTHMESH_CLIENT_ACCOUNT=alice:alice-password-1
    python examples/client_async.py 127.0.0.1:50061 --every 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc

from authmesh import SessionEnded, TokenSession, error_reason
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc


async def main(target: str, every: float) -> int:
    async with TokenSession.from_env(os.environ) as session, session.channel(target) as channel:
        stub = resource_pb2_grpc.ResourceServiceStub(channel)
        while True:
            try:
                me = await stub.WhoAmI(resource_pb2.WhoAmIRequest(), timeout=5)
            except grpc.aio.AioRpcError as error:  # refused by the service: revoked, say
                print(f"refused: {error_reason(error) or error.code().name}", flush=True)
                return 1
            except SessionEnded as ended:  # the auth service would not renew the session
                print(f"session ended: {ended.code}", flush=True)
                return 1
            print(
                f"ok: {me.subject} session {me.session_id} token {me.token_id} renewals {session.renewals}",
                flush=True,
            )
            await asyncio.sleep(every)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port of the protected service")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between calls")
    arguments = parser.parse_args()
    sys.exit(asyncio.run(main(arguments.target, arguments.every)))
