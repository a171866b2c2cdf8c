# Parley's container images, one target per image, around binaries that cargo builds.
#
# Build them with `make images` (product: gateway, operator) and `make test-images`
# (test-only: mock-llm, redis); see docs/images.md. Those run scripts/images.sh, which
# first builds static release binaries and stages them, with the CA bundle and the
# passwd/group files, under target/images/stage/ (the only part of the repository the
# build context sends, see .dockerignore); then `docker build --target <name>`.
#
# Every image is FROM scratch: no shell, no package manager, nothing but the binary
# (statically linked), Debian's Mozilla CA bundle at /etc/ssl/certs/ca-certificates.crt,
# and /etc/passwd and /etc/group naming the non-root user 65532 (`nonroot`) the images run
# as. Nothing is written to the root filesystem, so `readOnlyRootFilesystem: true` works.
# Only COPY steps (no RUN), so the classic builder and BuildKit build it alike, and no
# step needs a network.

# ---------------------------------------------------------------------------- common
# The labels come last in each stage: the revision changes with every commit, and a step
# after a changed one is never taken from the cache.
FROM scratch AS base
COPY target/images/stage/rootfs/ /
USER 65532:65532

# ---------------------------------------------------------------------------- gateway
# ghcr.io/parley-dev/parley-gateway:<appVersion>. The operator's Deployment passes
# `--config /etc/parley/config.yaml --log-format json --drain-seconds N` as args; without
# args the image serves (or `check`s) the config mounted at /etc/parley/config.yaml.
FROM base AS gateway
COPY target/images/stage/bin/parley-gateway /usr/local/bin/parley-gateway
EXPOSE 8080 9090
ENV PARLEY_CONFIG=/etc/parley/config.yaml
ENTRYPOINT ["/usr/local/bin/parley-gateway"]
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=https://github.com/parley-dev/parley
LABEL org.opencontainers.image.title=parley-gateway \
      org.opencontainers.image.description="Parley's LLM gateway (OpenAI- and Anthropic-compatible)" \
      org.opencontainers.image.source=$SOURCE \
      org.opencontainers.image.version=$VERSION \
      org.opencontainers.image.revision=$REVISION \
      org.opencontainers.image.licenses=Apache-2.0 \
      org.opencontainers.image.vendor=Parley

# ---------------------------------------------------------------------------- operator
# ghcr.io/parley-dev/parley-operator:<appVersion>. The chart passes `run ...` as args.
FROM base AS operator
COPY target/images/stage/bin/parley-operator /usr/local/bin/parley-operator
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/parley-operator"]
CMD ["run"]
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=https://github.com/parley-dev/parley
LABEL org.opencontainers.image.title=parley-operator \
      org.opencontainers.image.description="Parley's Kubernetes operator (Chatbot, Tenant, ModelRoute)" \
      org.opencontainers.image.source=$SOURCE \
      org.opencontainers.image.version=$VERSION \
      org.opencontainers.image.revision=$REVISION \
      org.opencontainers.image.licenses=Apache-2.0 \
      org.opencontainers.image.vendor=Parley

# ---------------------------------------------------------------------------- mock-llm
# Test only: ghcr.io/parley-dev/parley-mock-llm:<appVersion>, the fake upstream.
FROM base AS mock-llm
COPY target/images/stage/bin/parley-mock-llm /usr/local/bin/parley-mock-llm
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/parley-mock-llm"]
CMD ["--listen", "0.0.0.0:8000"]
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE=https://github.com/parley-dev/parley
LABEL org.opencontainers.image.title=parley-mock-llm \
      org.opencontainers.image.description="Fake OpenAI/Anthropic upstream for Parley's tests (not for production)" \
      org.opencontainers.image.source=$SOURCE \
      org.opencontainers.image.version=$VERSION \
      org.opencontainers.image.revision=$REVISION \
      org.opencontainers.image.licenses=Apache-2.0 \
      org.opencontainers.image.vendor=Parley

# ---------------------------------------------------------------------------- redis
# Test only: parley-test/redis:<Debian version>. Debian's redis-server with exactly the
# shared libraries `ldd` lists (and the dynamic loader), staged by scripts/images.sh.
# No persistence: nothing is written, so a read-only root filesystem works.
FROM scratch AS redis
COPY target/images/stage/redis/ /
USER 65532:65532
EXPOSE 6379
ENTRYPOINT ["/usr/bin/redis-server"]
CMD ["--save", "", "--appendonly", "no", "--protected-mode", "no", "--bind", "0.0.0.0", "--port", "6379"]
ARG REDIS_VERSION=unknown
ARG SOURCE=https://github.com/parley-dev/parley
LABEL org.opencontainers.image.title=parley-test-redis \
      org.opencontainers.image.description="Debian's redis-server for Parley's test cluster (not for production)" \
      org.opencontainers.image.source=$SOURCE \
      org.opencontainers.image.version=$REDIS_VERSION \
      org.opencontainers.image.licenses=BSD-3-Clause
