#!/usr/bin/env bash
# Make a local stand-in for `python:3.11-slim` when no registry can be reached (these CI machines
# reach PyPI and Debian's mirrors only). Debian bookworm's own Python is 3.11, so a minbase
# debootstrap plus python3, venv, pip and CA certificates is enough for the Dockerfile, which then
# stays standard (`FROM python:3.11-slim`). The host's CA bundle is copied in, because HTTPS to the
# registries may be intercepted by a local CA. Idempotent: does nothing when the tag exists.
#
#   bash docker/make-base-image.sh            # tag python:3.11-slim (default)
#   BASE_TAG=my/python:3.11 bash docker/make-base-image.sh
set -euo pipefail

BASE_TAG=${BASE_TAG:-python:3.11-slim}
SUITE=${SUITE:-bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
NICE=${NICE:-nice -n 19}

log() { echo "make-base-image: $*" >&2; }

# Bump when the recipe below changes: an older stand-in is then rebuilt; a real image is kept.
STAND_IN_VERSION=2
if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
  have=$(docker image inspect -f '{{index .Config.Labels "org.ivonserve.stand-in"}}' "$BASE_TAG")
  if [[ -z $have || $have == "<no value>" || $have == "$STAND_IN_VERSION" ]]; then
    log "$BASE_TAG already present${have:+ (stand-in v$have)}"
    exit 0
  fi
  log "$BASE_TAG is stand-in v$have; rebuilding as v$STAND_IN_VERSION"
fi
command -v debootstrap >/dev/null || {
  log "debootstrap missing (apt-get install -y --no-install-recommends debootstrap)"
  exit 1
}

# The mirror: $MIRROR, else the host's own apt sources (the first URIs line of deb822 sources,
# else the first `deb` line of sources.list); no mirror is named here.
mirror=${MIRROR:-}
if [[ -z $mirror ]]; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
fi
if [[ -z $mirror ]]; then
  mirror=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n 1 || true)
fi
if [[ -z $mirror ]]; then
  log "no Debian mirror: set MIRROR=URL (none in /etc/apt/sources.list.d/*.sources or sources.list)"
  exit 1
fi

root=$(mktemp -d /tmp/ivonserve-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
start=$(date +%s)
log "debootstrap $SUITE from $mirror into $root"
# libpython3.11-dev: the real image ships Python's headers, and torch's inductor (run by vLLM on
# the CPU) compiles C++ kernels that include Python.h.
$NICE debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,libpython3.11-dev,ca-certificates \
  "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 || {
  tail -30 "$root.log" >&2
  rm -f "$root.log"
  exit 1
}
rm -f "$root.log"

# The host's CA bundle (with any intercepting CA) joins the image's trust store.
if [[ -f $CA_BUNDLE ]]; then
  cp "$CA_BUNDLE" "$root/usr/local/share/ca-certificates/host-bundle.crt"
  chroot "$root" update-ca-certificates >/dev/null 2>&1 || true
fi
# Look like python:3.11-slim: `python`/`pip` on PATH, pip not blocked by PEP 668, no apt lists.
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
# Debian's docker images keep no apt caches (their docker-clean hook); do the same.
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log
echo "deb $mirror $SUITE main" >"$root/etc/apt/sources.list"

ca=/etc/ssl/certs/ca-certificates.crt
tar -C "$root" -c . | $NICE docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change "ENV SSL_CERT_FILE=$ca PIP_CERT=$ca REQUESTS_CA_BUNDLE=$ca" \
  --change 'CMD ["python3"]' \
  --change "LABEL org.ivonserve.stand-in=$STAND_IN_VERSION" \
  - "$BASE_TAG" >/dev/null
log "tagged $BASE_TAG ($(docker run --rm "$BASE_TAG" python3 --version)) in $(($(date +%s) - start)) s"
