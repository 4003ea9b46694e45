# The authmesh image: one slim Python image for every service (`authmesh auth-server`,
# `authmesh resource-server`, `authmesh demo`, `authmesh healthcheck`), run as an unprivileged user.
# docker-compose.yml builds it; configuration comes only from AUTHMESH_* variables.

FROM python:3.11-slim

# GRPC_VERBOSITY: gRPC's C core logs outside the services' JSON lines (at INFO, one per failed TLS
# handshake); ERROR keeps only its errors.
ENV PYTHONDONTWRITEBYTECODE=1 \
    GRPC_VERBOSITY=ERROR \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A system user without a login shell or a home; the services write nothing to disk.
RUN groupadd --system --gid 10001 authmesh \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin authmesh

WORKDIR /src
# Only what the distribution is built from (.dockerignore keeps the rest out of the context).
COPY pyproject.toml README.md ./
COPY requirements/lock.txt ./requirements/lock.txt
COPY authmesh ./authmesh
COPY auth_service ./auth_service
COPY resource_service ./resource_service
COPY shared ./shared
# The services and the command (`cli`, which includes the auth service's `server` extra) at the locked
# versions: no dev extras, no bundled servers, and no source tree left behind.
RUN pip install -c requirements/lock.txt '.[cli]' && rm -rf /src

WORKDIR /
USER 10001:10001
# gRPC (auth 50051, resource 50061) and HTTP (auth 8081, resource 8091) inside the compose network.
EXPOSE 50051 50061 8081 8091
ENTRYPOINT ["authmesh"]
CMD ["--help"]
