# syntax=docker/dockerfile:1.7
# clustermesh-apiserver: publishes this cluster's global services into etcd, and (managed mode)
# runs and supervises that etcd itself, so the runtime image carries Debian's etcd.
# Build from the repository root:
#   docker build -f images/clustermesh-apiserver.Dockerfile -t clustermesh/clustermesh-apiserver:dev .

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p clustermesh-apiserver --bin clustermesh-apiserver \
 && install -D -m 0755 target/release/clustermesh-apiserver /out/clustermesh-apiserver

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates etcd-server \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 clustermesh \
 && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/clustermesh --create-home clustermesh
COPY --from=build /out/clustermesh-apiserver /usr/local/bin/clustermesh-apiserver
# etcd client (2379), gRPC (9443), status/metrics (9963): the chart's defaults.
EXPOSE 2379 9443 9963
USER 65532:65532
WORKDIR /var/lib/clustermesh
ENTRYPOINT ["/usr/local/bin/clustermesh-apiserver"]
