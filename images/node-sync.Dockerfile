# syntax=docker/dockerfile:1.7
# node-sync: the node agent. Its build compiles the eBPF programs (global-lb-bpf-ebpf) with a nightly
# toolchain (rust-src, -Z build-std=core) and bpf-linker 0.10.0, which loads nightly's LLVM 22 at run
# time. It runs as root: loading eBPF programs, pinning maps and attaching to cgroups need it (the
# chart runs it privileged).
# Build from the repository root:
#   docker build -f images/node-sync.Dockerfile -t clustermesh/node-sync:dev .
# Pin the nightly with --build-arg RUST_NIGHTLY=nightly-YYYY-MM-DD (one whose LLVM is 22).

FROM rust:1.95-bookworm AS build
ARG RUST_NIGHTLY=nightly
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
# aya-build runs `cargo +nightly`: install the requested nightly under that name.
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
    cargo build --release --locked -p node-sync --bin node-sync \
 && install -D -m 0755 target/release/node-sync /out/node-sync

FROM debian:bookworm-slim
# mount (util-linux) is in the base image: the chart's init container uses it to mount bpffs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/node-sync /usr/local/bin/node-sync
# status/metrics (the chart's default; node-sync runs with the host network).
EXPOSE 9964
ENTRYPOINT ["/usr/local/bin/node-sync"]
