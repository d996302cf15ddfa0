# syntax=docker/dockerfile:1
# tollgate container image. Not built in CI (no container engine there): build it with
#   docker build -t tollgate:0.1.0 .
# The runtime stage runs as uid/gid 10001 (the chart's default) and is happy with a read-only root
# filesystem: tollgate writes only to metering.dir (/var/lib/tollgate, a volume).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
# make: tikv-jemalloc-sys builds jemalloc from source.
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
COPY . .
# BuildKit cache mounts keep the crate registry and the target folder between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/tollgate /out/tollgate

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: the Stripe client verifies TLS against the system roots.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /etc/tollgate /var/lib/tollgate \
    && chown 10001:10001 /var/lib/tollgate
COPY --from=build /out/tollgate /usr/local/bin/tollgate
USER 10001:10001
WORKDIR /var/lib/tollgate
VOLUME ["/var/lib/tollgate"]
# 9001: gRPC (ext_authz, access-log service, grpc.health.v1). 9002: admin HTTP (/metrics, /healthz, /readyz, /v1).
EXPOSE 9001 9002
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve", "--config", "/etc/tollgate/config.yaml"]
