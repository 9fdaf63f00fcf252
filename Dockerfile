# Build: docker build -t weightgate .   (docker-compose.yml builds it for you)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/weightgate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/weightgate weightgate && mkdir -p /var/lib/weightgate && chown weightgate /var/lib/weightgate
COPY --from=build /src/target/release/weightgate /usr/local/bin/weightgate
USER weightgate
ENV WEIGHTGATE__DATA_DIR=/var/lib/weightgate WEIGHTGATE__SERVER__BIND=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["weightgate"]
CMD ["serve"]
