# kiln-operator: a runtime image holding only the binary, the libraries it links, the CA bundle and a
# passwd naming the non-root user 65532. Two ways to build it, one Dockerfile:
#   - with registry access: docker build -f images/operator.Dockerfile -t kiln-operator:0.1.0 .
#     (compiles in the Rust image, then copies the result onto scratch);
#   - without pulling anything (make images): the `rootfs` stage is replaced by the directory
#     scripts/image.py assembled from the host-built binary:
#     docker build --build-context rootfs=target/images/kiln-operator-rootfs -f images/operator.Dockerfile .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kiln-operator --bin kiln-operator \
 && mkdir -p /rootfs/usr/local/bin /rootfs/etc/ssl/certs /rootfs/tmp /rootfs/home/nonroot \
 && cp target/release/kiln-operator /rootfs/usr/local/bin/ \
 && for lib in $(ldd target/release/kiln-operator | grep -o '/[^ ]*'); do cp --parents -L "$lib" /rootfs; done \
 && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ \
 && printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > /rootfs/etc/passwd \
 && printf 'root:x:0:\nnonroot:x:65532:\n' > /rootfs/etc/group \
 && chmod 1777 /rootfs/tmp && chown 65532:65532 /rootfs/home/nonroot

FROM scratch AS rootfs
COPY --from=build /rootfs /

FROM scratch
COPY --from=rootfs / /
USER 65532:65532
WORKDIR /home/nonroot
ENV PATH=/usr/local/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
ENTRYPOINT ["/usr/local/bin/kiln-operator"]
