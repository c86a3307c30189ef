# The uploadhook container image; charts/uploadhook deploys it.
#
#   docker build -t uploadhook:0.1.0 .
#
# Needs BuildKit (the default builder since Docker 23): the cargo registry and
# the target directory live in cache mounts, so a rebuild after a source change
# recompiles uploadhook only, not its dependencies. build.rs compiles proto/
# with protox (pure Rust), so the builder needs no protoc.
#
# The image runs as the numeric user 65532 (distroless "nonroot") and writes
# nothing to its file system when configured as in production (PostgreSQL,
# Redis, a [storage.<name>] connection), so it runs with a read-only root.
# Pass the role and the configuration:
#
#   docker run --rm -p 50051:50051 -p 8080:8080 \
#     -e UPLOADHOOK_SERVER__GRPC_ADDR=0.0.0.0:50051 \
#     -e UPLOADHOOK_SERVER__HTTP_ADDR=0.0.0.0:8080 \
#     -v "$PWD/prod.toml:/etc/uploadhook/config.toml:ro" \
#     uploadhook:0.1.0 --config /etc/uploadhook/config.toml api
#
# The listen addresses are deliberately not set with ENV here: environment
# variables override the config file, and would silently win over it.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Only what the build reads (see .dockerignore): manifests, build script,
# contract, the compiled-in defaults, the migrations crate and the sources.
COPY Cargo.toml Cargo.lock build.rs config.default.toml ./
COPY proto ./proto
COPY migrations ./migrations
COPY src ./src
RUN --mount=type=cache,id=uploadhook-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=uploadhook-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=uploadhook-target,target=/src/target,sharing=locked \
    cargo build --release --locked --bin uploadhook \
 && install -D -m 0755 target/release/uploadhook /out/uploadhook

# glibc, libgcc and CA certificates, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/uploadhook /usr/local/bin/uploadhook
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 65532:65532
WORKDIR /home/nonroot
# gRPC (server.grpc_addr) and HTTP: REST gateway, /healthz, /readyz
# (server.http_addr).
EXPOSE 50051 8080
ENTRYPOINT ["/usr/local/bin/uploadhook"]
CMD ["--help"]
