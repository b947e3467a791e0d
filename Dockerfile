# segloop: build with the Rust toolchain, run on a slim Debian.
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY schemas ./schemas
COPY benches ./benches
RUN cargo build --release --locked --bin segloop

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 segloop
COPY --from=build /src/target/release/segloop /usr/local/bin/segloop
COPY config /etc/segloop
USER segloop
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/segloop"]
CMD ["run", "--config", "/etc/segloop/docker.toml"]
