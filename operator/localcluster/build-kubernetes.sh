#!/usr/bin/env bash
# Build Kubernetes v1.20.2 from Debian bookworm's source package for the local cluster the tests, the demo and the
# benchmarks run on: the control plane (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl), the real
# node (kubelet, kube-proxy, and the pause image's binary from build/pause/linux/pause.c) and the device plugin API
# definition the simulated Neuron device plugin speaks. Installs etcd, containerd, runc, the CNI plugins, buildah
# and mmdebstrap from Debian.
#
# Needs root on Debian bookworm (it installs packages). Everything is cached outside the work tree, so a warm
# machine builds nothing:
#   ${NEURON_OPERATOR_CACHE:-$HOME/.cache/neuron-model-operator}/kubernetes-v1.20.2-<key>/{bin,share}
# The source tree and Go's build cache stay in build/ and go-build/ beside it at fixed paths, so a change of the
# recipe rebuilds only what changed. With --print-bin-dir it only prints the bin directory (how localcluster finds
# the binaries).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${NEURON_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/neuron-model-operator}"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)
# The cache key covers what decides the outputs: the recipe below and the patch.
recipe="kubernetes 1.20.2 debian-bookworm-source golang-1.19 CGO_ENABLED=0 ${binaries[*]} pause-gcc-static api.proto"
key="$( (echo "$recipe"; cat "$here/reflect2-go118.patch") | sha256sum | cut -c1-12)"
out="$cache/kubernetes-v1.20.2-$key"
if [ "${1:-}" = "--print-bin-dir" ]; then
  echo "$out/bin"
  exit 0
fi
packages=(golang-1.19-go rsync make etcd-server dpkg-dev patch openssl gcc libc6-dev
  containerd runc containernetworking-plugins iptables conntrack buildah mmdebstrap)
proto=share/deviceplugin-v1beta1-api.proto

log() { printf '[kubernetes] %s\n' "$*" >&2; }

missing_packages() {
  local p
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf '%s ' "$p"
  done
}

built() {
  local b
  for b in "${binaries[@]}" pause; do [ -x "$out/bin/$b" ] || return 1; done
  [ -f "$out/$proto" ]
}

todo="$(missing_packages)"
if built && [ -z "$todo" ]; then
  log "cached: $out"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  log "must run as root to install packages ($todo) and build; run: sudo bash $0"
  exit 1
fi

if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding a deb-src entry for bookworm main (apt-get source needs it)"
  cat > /etc/apt/sources.list.d/neuron-operator-src.sources <<'SOURCES'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  todo="${todo:-source-index}"
fi

if [ -n "$todo" ] || ! built; then
  log "apt-get update; installing: ${todo:-nothing}"
  apt-get update -qq
  # shellcheck disable=SC2086
  [ -z "$(missing_packages)" ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(missing_packages) >/dev/null
fi

if built; then
  log "cached: $out"
  exit 0
fi

# A fixed path: Go's cache keys include source paths, so a tree at the same place reuses every unchanged package.
work="$cache/build"
tree="$work/kubernetes"
stamp="$tree/.neuron-operator-$key"
if [ ! -f "$stamp" ]; then
  rm -rf "$work"
  mkdir -p "$work"
  cd "$work"
  log "fetching Debian's kubernetes source package into $work"
  apt-get source -qq kubernetes 2>&1 | grep -v "unsandboxed" >&2 || true
  src="$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)"
  [ -n "$src" ] || { log "apt-get source kubernetes produced no source tree"; exit 1; }
  mv "$src" "$tree"
  cd "$tree"
  log "patching the vendored reflect2 for Go 1.18+ map iteration"
  patch -p1 --forward --silent < "$here/reflect2-go118.patch"
  # hack/lib/golang.sh points GOCACHE inside the tree; let ours (outside it, kept across builds) win.
  sed -i 's|export GOCACHE="${KUBE_GOPATH}/cache"|export GOCACHE="${GOCACHE:-${KUBE_GOPATH}/cache}"|' hack/lib/golang.sh
  grep -q 'GOCACHE="${GOCACHE:-' hack/lib/golang.sh || { log "could not redirect GOCACHE in hack/lib/golang.sh"; exit 1; }
  touch "$stamp"
fi
cd "$tree"

log "building ${binaries[*]} with Go 1.19 (about 10 minutes cold on 2 cores, seconds warm)"
start=$(date +%s)
env PATH="/usr/lib/go-1.19/bin:$PATH" CGO_ENABLED=0 GOCACHE="$cache/go-build" \
  HOME="$work" make WHAT="${binaries[*]/#/cmd/}" >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  log "build failed; full log: $work/build.log"
  exit 1
}
log "built in $(($(date +%s) - start)) s"

staging="$out.tmp"
rm -rf "$staging"
mkdir -p "$staging/bin" "$staging/share"
for b in "${binaries[@]}"; do cp "_output/bin/$b" "$staging/bin/"; done
# The sandbox image's only binary; static, since the image holds nothing else.
gcc -Os -static -o "$staging/bin/pause" -DVERSION=v1.20.2-local build/pause/linux/pause.c
cp vendor/k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1/api.proto "$staging/$proto"
rm -rf "$out"
mv "$staging" "$out"
for stale in "$cache"/kubernetes-v*; do  # outputs of an older recipe or patch
  [ "$stale" = "$out" ] || rm -rf "$stale"
done
rm -rf "$tree/_output/local/go/bin" "$tree/_output/bin" "$tree/_output/local/bin"
log "installed: $out"
