#!/usr/bin/env bash
# Makes a local Debian bookworm base image with Python 3.11 from Debian's packages alone, for machines whose Docker
# engine reaches no registry (so `FROM python:3.11-slim-bookworm` cannot be pulled). Needs root, debootstrap and a
# running engine. Build the tbrm images on it with --build-arg PYTHON_IMAGE=<NAME> (deploy/docker/build.sh does).
#   deploy/docker/make-base.sh [NAME]      default NAME: tbrm-base:bookworm
# DEBIAN_MIRROR overrides the mirror (default: the first URIs: line of the host's apt sources, else deb.debian.org).
set -euo pipefail

name=${1:-tbrm-base:bookworm}
if docker image inspect "$name" >/dev/null 2>&1 && [ "${FORCE:-0}" != 1 ]; then
  echo "make-base: $name exists (FORCE=1 rebuilds it)"
  exit 0
fi
sources=/etc/apt/sources.list.d/debian.sources
mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' "$sources" 2>/dev/null || true)}
mirror=${mirror:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || { echo "make-base: install debootstrap (apt-get install debootstrap)" >&2; exit 2; }

rootfs=$(mktemp -d /var/tmp/tbrm-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
# python3-dev: DeepSpeed JIT-compiles a C++ op against Python.h (the python:* images ship the headers too);
# python-is-python3: `python` on PATH as in the python:* images.
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-dev,python-is-python3,ca-certificates \
  bookworm "$rootfs" "$mirror"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  - "$name"
docker run --rm "$name" python -c 'import sys, venv; print("make-base:", sys.version.split()[0])'
