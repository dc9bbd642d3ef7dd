#!/usr/bin/env bash
# scripts/setup.sh — install every Debian package fpxint needs to build, test and demo.
#
# Idempotent: checks each package with dpkg-query first and prints nothing when all are present.
# Run as root (or with sudo available). Set FPXINT_SETUP_DRY_RUN=1 to only list what is missing.
set -euo pipefail

# Build toolchain and C++ libraries (docs/ARCHITECTURE.md "Toolchain").
PKGS_BUILD=(
  build-essential cmake ninja-build pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  prometheus-cpp-dev libtorch-dev libopenblas0-pthread
  libgtest-dev libgmock-dev libbenchmark-dev libsqlite3-dev libcli11-dev nlohmann-json3-dev libssl-dev
  libseccomp-dev libre2-dev libyaml-cpp-dev libpq-dev
)
# Fuzzing and sanitizers (libFuzzer ships with clang's runtime).
PKGS_FUZZ=(clang libclang-rt-14-dev)
# Python side: model conversion and real gRPC clients. Always call /usr/bin/python3
# (docs/ARCHITECTURE.md, toolchain trap 5).
PKGS_PY=(python3 python3-numpy python3-torch python3-onnx python3-grpcio python3-grpc-tools python3-protobuf python3-pil python3-matplotlib
         python3-yaml)
# Data rendering, model download (npm), monitoring tests, PostgreSQL for the journal tests (each
# starts its own server in a temporary directory), compose-file validation (no daemon),
# `script` for the CLI's pseudo-terminal test, openssl for the TLS tests' certificates.
PKGS_MISC=(fonts-dejavu-core nodejs npm ca-certificates curl prometheus dataset-fashion-mnist
           docker-compose bsdutils openssl postgresql-15)

missing=()
for p in "${PKGS_BUILD[@]}" "${PKGS_FUZZ[@]}" "${PKGS_PY[@]}" "${PKGS_MISC[@]}"; do
  if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
    # npm/nodejs may come from outside Debian (e.g. a preinstalled Node); accept a working binary.
    case "$p" in
      nodejs) command -v node >/dev/null 2>&1 && continue ;;
      npm) command -v npm >/dev/null 2>&1 && continue ;;
    esac
    missing+=("$p")
  fi
done

# The Node end-to-end client's packages (@grpc/grpc-js, @grpc/proto-loader), pinned by
# tests/e2e/node/package-lock.json; installed again only when the lock file changes.
node_deps() {
  local dir
  dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/e2e/node"
  [[ -f "$dir/package-lock.json" ]] || return 0
  if [[ ! -f "$dir/node_modules/.package-lock.json" || "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]]; then
    echo "setup.sh: npm ci in tests/e2e/node" >&2
    (cd "$dir" && npm ci --no-audit --no-fund --silent >/dev/null) ||
      { echo "setup.sh: npm ci failed in $dir (the npm registry must be reachable)" >&2; exit 1; }
  fi
}

if [[ ${#missing[@]} -eq 0 ]]; then
  node_deps
  exit 0
fi

if [[ "${FPXINT_SETUP_DRY_RUN:-0}" == 1 ]]; then
  printf 'missing: %s\n' "${missing[*]}"
  exit 1
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "setup.sh: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi

echo "setup.sh: installing ${#missing[@]} Debian package(s): ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
node_deps
echo "setup.sh: done" >&2
