# relay in a container: the agent by default (`relay run`); `docker run … IMAGE node run` runs
# a node. Build with `docker build -t relay .`; README, "Docker", shows how to run it.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's simulator member: cargo needs its manifest; only relay is built.
COPY tests/ado-sim ./tests/ado-sim
RUN cargo build --release --locked

FROM debian:bookworm-slim
# CA roots for webhooks and nodes with a certificate from a public CA; nothing else.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --home-dir /var/lib/relay --no-create-home \
        --shell /usr/sbin/nologin relay \
    && install -d -m 0700 -o relay -g relay /var/lib/relay
COPY --from=build /src/target/release/relay /usr/bin/relay

# The database, the credentials and the admin socket: keep it on a volume.
ENV RELAY_DATA_DIR=/var/lib/relay
VOLUME ["/var/lib/relay"]
# The intake API stays on loopback (the configuration's default): other containers reach it
# only once RELAY_AGENT__INTAKE_LISTEN=0.0.0.0:8081 is set, which relay refuses without
# RELAY_AGENT__API_TOKEN. The node's agent-facing listener is 0.0.0.0:8443.

# Numeric, so that a runtime enforcing "run as non-root" can check it.
USER 10001:10001
# Asks the running daemon over its admin socket, then GETs its /healthz: no curl needed.
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 CMD ["relay", "health"]
ENTRYPOINT ["relay"]
CMD ["run"]
