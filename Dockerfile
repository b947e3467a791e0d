# segloop: build with the Rust toolchain, run on a slim Debian.
# docker build --build-arg SEGLOOP_COMMIT=$(git rev-parse --short HEAD) -t segloop .
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev pkg-config && rm -rf /var/lib/apt/lists/*
# Dependencies first, in a layer of their own: rebuilt only when Cargo.toml or Cargo.lock
# change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin segloop \
    && rm -rf src target/release/segloop target/release/deps/segloop-* target/release/deps/libsegloop-*
COPY src ./src
COPY schemas ./schemas
# The commit, for segloop_build_info{version,commit}.
ARG SEGLOOP_COMMIT=unknown
RUN SEGLOOP_COMMIT=${SEGLOOP_COMMIT} cargo build --release --locked --bin segloop \
    && strip target/release/segloop

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 segloop
COPY --from=build /src/target/release/segloop /usr/local/bin/segloop
COPY config /etc/segloop
USER segloop
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/segloop"]
CMD ["run", "--config", "/etc/segloop/docker.toml"]
