# cloudlb operator image: a static binary, the CA bundle, a non-root user, nothing else (no shell).
# Without a Docker engine, scripts/build-image assembles the same final stage with buildah.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
ENV RUSTFLAGS="-C target-feature=+crt-static"
RUN cargo build --release --locked --bin cloudlb --target x86_64-unknown-linux-gnu \
 && cp target/x86_64-unknown-linux-gnu/release/cloudlb /cloudlb

FROM debian:bookworm-slim AS certs
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates=20230311* \
 && rm -rf /var/lib/apt/lists/*

FROM scratch
COPY --from=certs /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /cloudlb /cloudlb
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/cloudlb"]
CMD ["run"]
