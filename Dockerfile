# fpxint — multi-stage image on Debian bookworm. The build stage runs exactly what CI runs to
# build (scripts/setup.sh, make build), so the two cannot drift apart. The runtime stage is
# filled out by the deployment issue (slim runtime libraries, non-root user, health check).
FROM debian:bookworm AS build
WORKDIR /src
COPY scripts/setup.sh scripts/setup.sh
RUN scripts/setup.sh
COPY . .
RUN make build

FROM debian:bookworm-slim AS runtime
RUN useradd --system --create-home fpxint
COPY --from=build /src/build/bin/fpxint /usr/local/bin/fpxint
USER fpxint
ENTRYPOINT ["/usr/local/bin/fpxint"]
