# The container image of the cloudlb operator.
# The full multi-stage build (static binary, CA certificates, non-root) lands with the
# "Install and operate in a cluster" issue; this stage builds the binary today.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin cloudlb

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/cloudlb /cloudlb
USER nonroot
ENTRYPOINT ["/cloudlb"]
CMD ["run"]
