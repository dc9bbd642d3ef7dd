# fpxint — multi-stage image on Debian bookworm.
#
# The build stage runs exactly what CI runs to build (scripts/setup.sh, then make build), so the
# image and CI cannot drift apart. The runtime stage holds the two binaries and only the shared
# libraries they load (scripts/runtime-packages.txt), runs as an unprivileged user and keeps all
# state in the volume /var/lib/fpxint. docs/DEPLOY.md explains how to run it.
#
#   docker build -t fpxint .
#   docker run -p 8001:8001 -p 8002:8002 -v fpxint-data:/var/lib/fpxint \
#     -v $PWD/tokens:/etc/fpxint/tokens:ro -e FPXINT_TOKEN_FILE=/etc/fpxint/tokens fpxint
#
# Without a token file the server refuses to listen on 0.0.0.0 unless FPXINT_INSECURE_NO_AUTH=true
# (then publish the ports on loopback only: -p 127.0.0.1:8001:8001).

# ---------------------------------------------------------------------------------------------
FROM debian:bookworm AS build
WORKDIR /src
# Packages first: this layer is cached until setup.sh itself changes.
COPY scripts/setup.sh scripts/setup.sh
RUN scripts/setup.sh
COPY . .
RUN make build

# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# Runtime libraries only, from a reviewable list ('#' comments and blank lines are skipped).
COPY scripts/runtime-packages.txt /tmp/runtime-packages.txt
RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update -qq; \
    sed -e 's/#.*//' /tmp/runtime-packages.txt | xargs apt-get install -y -qq --no-install-recommends; \
    rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt

# Fixed numeric ids, so Kubernetes' runAsNonRoot can verify the user (deploy/k8s/deployment.yaml).
RUN groupadd --system --gid 10001 fpxint \
 && useradd --system --uid 10001 --gid fpxint --home-dir /var/lib/fpxint --no-create-home \
      --shell /usr/sbin/nologin fpxint \
 && mkdir -p /var/lib/fpxint \
 && chown fpxint:fpxint /var/lib/fpxint \
 && chmod 0750 /var/lib/fpxint

COPY --from=build /src/build/bin/fpxint-server /usr/local/bin/fpxint-server
COPY --from=build /src/build/bin/fpxint /usr/local/bin/fpxint
# The sandboxed TorchScript vetter; fpxint-server runs it from its own directory.
COPY --from=build /src/build/bin/fpxint-vet /usr/local/bin/fpxint-vet
# The MLOps pipeline step (deploy/pipeline/README.md), for the Kubeflow component.
COPY --from=build /src/deploy/pipeline/fpxint-quantize-step.sh /usr/local/share/fpxint/fpxint-quantize-step.sh

# Fail the image build, not the first start, when runtime-packages.txt misses a library.
RUN if ldd /usr/local/bin/fpxint-server /usr/local/bin/fpxint /usr/local/bin/fpxint-vet | grep 'not found'; then \
      echo 'missing shared libraries: add their packages to scripts/runtime-packages.txt' >&2; \
      exit 1; \
    fi \
 && /usr/local/bin/fpxint-server --version

ENV FPXINT_LISTEN=0.0.0.0:8001 \
    FPXINT_METRICS_LISTEN=0.0.0.0:8002 \
    FPXINT_DATA_DIR=/var/lib/fpxint \
    HOME=/var/lib/fpxint

VOLUME /var/lib/fpxint
WORKDIR /var/lib/fpxint
# 8001: gRPC (fpxint.v1.Quantizer, inference.GRPCInferenceService, grpc.health.v1.Health);
# 8002: Prometheus metrics (/metrics).
EXPOSE 8001 8002

USER 10001:10001

# The gRPC health service answers without a token; exit 0 only when it says SERVING. The start
# period covers LibTorch's start-up and the reload of served models from the repository.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/fpxint", "health", "--server", "127.0.0.1:8001", "--timeout", "3"]

# SIGTERM (docker stop): stop accepting, let running jobs finish for --shutdown-grace seconds
# (FPXINT_SHUTDOWN_GRACE), re-queue the rest, exit 0. Give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fpxint-server"]
