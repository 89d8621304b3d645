# syntax=docker/dockerfile:1.7
# clustermesh: the command-line tool (ca, certs, connect, status, drill, ...). The chart's certgen
# Job runs it (`clustermesh ca init|issue-cluster`) and stores the results as Secrets with curl, so
# the image carries bash and curl. Non-root.
# Build from the repository root:
#   docker build -f images/clustermesh.Dockerfile -t clustermesh/clustermesh:dev .
# The CLI's workspace may pull in the datapath crate, so the builder has the eBPF toolchain too
# (see node-sync.Dockerfile).

FROM rust:1.95-bookworm AS build
ARG RUST_NIGHTLY=nightly
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install "${RUST_NIGHTLY}" --profile minimal --component rust-src \
 && if [ "${RUST_NIGHTLY}" != nightly ]; then \
      rustup toolchain link nightly "$(rustc +"${RUST_NIGHTLY}" --print sysroot)"; \
    fi
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo install bpf-linker@0.10.0 --locked
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p clustermesh-cli --bin clustermesh \
 && install -D -m 0755 target/release/clustermesh /out/clustermesh

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 clustermesh \
 && useradd --system --uid 65532 --gid 65532 --home-dir /home/clustermesh --create-home clustermesh
COPY --from=build /out/clustermesh /usr/local/bin/clustermesh
USER 65532:65532
WORKDIR /home/clustermesh
ENTRYPOINT ["/usr/local/bin/clustermesh"]
