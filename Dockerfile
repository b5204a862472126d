# relay in a container: the agent by default (`relay run`); `docker run … IMAGE node run` runs
# a node. README, "Docker", shows how to build and run it.
#
# One runtime stage (the last one), two ways to get the binary into it:
#   docker build -t relay .
#       compiles relay here, in rust:1-bookworm (BINARY=compile, the default);
#   docker build -t relay --build-arg BINARY=prebuilt -f Dockerfile DIR
#       takes DIR/relay, a binary built beforehand for Debian bookworm (CI does this: it has
#       built relay already and reaches no image registry).
# BASE is the Debian bookworm image the C library and the CA roots come from; a local image
# made with debootstrap works as well as debian:bookworm-slim.
# Needs BuildKit (DOCKER_BUILDKIT=1 on Docker 20.10; the default from 23.0), which builds
# only the stages the runtime stage uses.

ARG BASE=debian:bookworm-slim
ARG BINARY=compile

FROM rust:1-bookworm AS compile
# MIT Kerberos's GSSAPI headers and libclang: the libgssapi crate makes its bindings from them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libkrb5-dev libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's simulator member: cargo needs its manifest; only relay is built.
COPY tests/ado-sim ./tests/ado-sim
RUN cargo build --release --locked && install -D -m 0755 target/release/relay /out/relay

FROM scratch AS prebuilt
COPY relay /out/relay

FROM ${BINARY} AS binary

# Everything the runtime stage holds, gathered under /rootfs.
FROM ${BASE} AS rootfs
# The CA roots, and MIT Kerberos's GSSAPI library (Kerberos proxy authentication), unless
# BASE has them.
RUN if [ ! -s /etc/ssl/certs/ca-certificates.crt ] || ! ls /usr/lib/*/libgssapi_krb5.so.2 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ca-certificates libgssapi-krb5-2 \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=binary /out/relay /rootfs/usr/bin/relay
# The binary, the shared libraries it links (the C library and the loader), the CA roots, a
# user and group relay (10001), and the data directory: nothing else that could run, no shell.
RUN set -eu; \
    cd /rootfs; \
    chmod 0755 usr/bin/relay; \
    for lib in $(ldd usr/bin/relay | grep -o '/[^ ]*'); do cp --parents -L "$lib" .; done; \
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt etc/ssl/certs/ca-certificates.crt; \
    printf 'root:x:0:0:root:/nonexistent:/nonexistent\nrelay:x:10001:10001:relay daemon:/var/lib/relay:/nonexistent\n' >etc/passwd; \
    printf 'root:x:0:\nrelay:x:10001:\n' >etc/group; \
    printf 'passwd: files\ngroup: files\nhosts: files dns\n' >etc/nsswitch.conf; \
    install -d -m 1777 tmp; \
    install -d -m 0700 -o 10001 -g 10001 var/lib/relay; \
    ./usr/bin/relay --version

# The runtime stage.
FROM scratch
COPY --from=rootfs /rootfs/ /
ENV PATH=/usr/bin \
    RELAY_DATA_DIR=/var/lib/relay
# The database, the credentials and the admin socket: keep it on a volume. Nothing else is
# written, so the container runs with --read-only.
VOLUME ["/var/lib/relay"]
# The intake API stays on loopback (the configuration's default): other containers reach it
# only once RELAY_AGENT__INTAKE_LISTEN=0.0.0.0:8081 is set, which relay refuses without
# RELAY_AGENT__API_TOKEN. The node's agent-facing listener is 0.0.0.0:8443.
EXPOSE 8443

# Numeric, so that a runtime enforcing "run as non-root" can check it.
USER 10001:10001
# Asks the running daemon over its admin socket, then GETs its /readyz: healthy once the
# agent reaches its node and delivers, unhealthy while it cannot. No curl needed.
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 CMD ["relay", "health", "--ready"]
ENTRYPOINT ["relay"]
CMD ["run"]
