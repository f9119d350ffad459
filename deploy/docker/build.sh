#!/usr/bin/env bash
# Builds the CPU images without any registry: tbrm:cpu, tbrm-redis:bookworm and tbrm-prometheus:bookworm on the
# local Debian base (deploy/docker/make-base.sh, made here if missing), torch from the wheelhouse, pip through the
# machine's CA bundle passed as a BuildKit secret. Run from anywhere; builds from the repository root.
#   deploy/docker/build.sh [cpu|redis|prometheus ...]      default: all three
# Environment: TBRM_BASE_IMAGE (tbrm-base:bookworm), TBRM_IMAGE_CPU (tbrm:cpu), TBRM_REDIS_IMAGE,
# TBRM_PROMETHEUS_IMAGE, TBRM_PIP_CA (/etc/ssl/certs/ca-certificates.crt), TBRM_WHEELS (pip's find-links folder).
set -euo pipefail
cd "$(dirname "$0")/../.."

base=${TBRM_BASE_IMAGE:-tbrm-base:bookworm}
ca=${TBRM_PIP_CA:-/etc/ssl/certs/ca-certificates.crt}
wheels=${TBRM_WHEELS:-$(pip config get global.find-links 2>/dev/null || true)}

# BuildKit is needed (RUN --mount, secrets). A client with the buildx plugin uses it by default; a newer client
# WITHOUT buildx refuses DOCKER_BUILDKIT=1, but Debian's docker.io client (20.10, /usr/bin/docker) has it built in.
docker_build() {
  if docker buildx version >/dev/null 2>&1; then
    docker build "$@"
  else
    DOCKER_BUILDKIT=1 "${TBRM_DOCKER_BUILD_CLI:-/usr/bin/docker}" build "$@"
  fi
}

timed() {  # timed LABEL CMD...: runs CMD and prints how long it took
  local label=$1 t0=$SECONDS
  shift
  "$@"
  echo "build.sh: $label built in $((SECONDS - t0)) s"
}

build_cpu() {
  local args=(--build-arg "PYTHON_IMAGE=$base")
  if compgen -G "$wheels/torch-*+cpu-*.whl" >/dev/null; then
    cp -u "$wheels"/torch-*+cpu-*.whl wheelhouse/
  fi
  if compgen -G "wheelhouse/torch-*.whl" >/dev/null; then
    args+=(--build-arg TORCH_INDEX_URL=)  # torch from the wheelhouse
  fi
  if [ -s "$ca" ]; then
    args+=(--secret "id=pip-ca,src=$ca")
  fi
  timed "${TBRM_IMAGE_CPU:-tbrm:cpu}" docker_build -f deploy/docker/Dockerfile "${args[@]}" -t "${TBRM_IMAGE_CPU:-tbrm:cpu}" .
}

deploy/docker/make-base.sh "$base"
for what in "${@:-cpu redis prometheus}"; do
  for w in $what; do
    case $w in
      cpu) build_cpu ;;
      redis) timed "${TBRM_REDIS_IMAGE:-tbrm-redis:bookworm}" docker_build -f deploy/docker/Dockerfile.redis \
               --build-arg "BASE_IMAGE=$base" -t "${TBRM_REDIS_IMAGE:-tbrm-redis:bookworm}" . ;;
      prometheus) timed "${TBRM_PROMETHEUS_IMAGE:-tbrm-prometheus:bookworm}" docker_build \
               -f deploy/docker/Dockerfile.prometheus --build-arg "BASE_IMAGE=$base" \
               -t "${TBRM_PROMETHEUS_IMAGE:-tbrm-prometheus:bookworm}" . ;;
      *) echo "build.sh: unknown image $w (cpu, redis, prometheus)" >&2; exit 2 ;;
    esac
  done
done
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^tbrm' || true
