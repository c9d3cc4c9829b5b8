#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler and kubectl v1.20.2 from Debian bookworm's source
# package, and install etcd, for the local control plane the tests, the demo and the benchmarks run on.
#
# Needs root on Debian bookworm (it installs packages). The binaries are cached outside the work tree, keyed by
# this script and the patch, so a warm machine builds nothing:
#   ${NEURON_OPERATOR_CACHE:-$HOME/.cache/neuron-model-operator}/kubernetes-v1.20.2-<key>/bin
# With --print-bin-dir it only prints that directory (how localcluster finds the binaries).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${NEURON_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/neuron-model-operator}"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
# The cache key covers what decides the binaries: the recipe below and the patch.
recipe="kubernetes 1.20.2 debian-bookworm-source golang-1.19 CGO_ENABLED=0 ${binaries[*]}"
key="$( (echo "$recipe"; cat "$here/reflect2-go118.patch") | sha256sum | cut -c1-12)"
out="$cache/kubernetes-v1.20.2-$key"
if [ "${1:-}" = "--print-bin-dir" ]; then
  echo "$out/bin"
  exit 0
fi
packages=(golang-1.19-go rsync make etcd-server dpkg-dev patch openssl)

log() { printf '[control-plane] %s\n' "$*" >&2; }

missing_packages() {
  local p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf '%s ' "$p"
  done
}

built() {
  local b
  for b in "${binaries[@]}"; do [ -x "$out/bin/$b" ] || return 1; done
}

todo="$(missing_packages)"
if built && [ -z "$todo" ]; then
  log "cached: $out/bin"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  log "must run as root to install packages ($todo) and build; run: sudo bash $0"
  exit 1
fi

if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding a deb-src entry for bookworm main (apt-get source needs it)"
  cat > /etc/apt/sources.list.d/neuron-operator-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  todo="${todo:-source-index}"
fi

if [ -n "$todo" ] || ! built; then
  log "apt-get update; installing: ${todo:-nothing}"
  apt-get update -qq
  # shellcheck disable=SC2086
  [ -z "$(missing_packages)" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(missing_packages) >/dev/null
fi

if built; then
  log "cached: $out/bin"
  exit 0
fi

work="$cache/build-$key"
rm -rf "$work"
mkdir -p "$work"
cd "$work"
log "fetching Debian's kubernetes source package into $work"
apt-get source -qq kubernetes 2>&1 | grep -v "unsandboxed" >&2 || true
tree="$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)"
[ -n "$tree" ] || { log "apt-get source kubernetes produced no source tree"; exit 1; }
cd "$tree"

log "patching the vendored reflect2 for Go 1.18+ map iteration"
patch -p1 --forward --silent < "$here/reflect2-go118.patch"

log "building ${binaries[*]} with Go 1.19 (several minutes on 2 cores)"
start=$(date +%s)
mkdir -p .go/src/k8s.io
[ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
env GOPATH="$tree/.go" PATH="/usr/lib/go-1.19/bin:$PATH" CGO_ENABLED=0 GOCACHE="$cache/go-build" \
  HOME="$work" make WHAT="${binaries[*]/#/cmd/}" >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  log "build failed; full log: $work/build.log"
  exit 1
}
log "built in $(($(date +%s) - start)) s"

staging="$out.tmp"
rm -rf "$staging"
mkdir -p "$staging/bin"
for b in "${binaries[@]}"; do cp "_output/bin/$b" "$staging/bin/"; done
rm -rf "$out"
mv "$staging" "$out"
for stale in "$cache"/kubernetes-v*; do  # builds of an older recipe or patch
  [ "$stale" = "$out" ] || rm -rf "$stale"
done
cd "$cache"
rm -rf "$work"
log "installed: $out/bin"
