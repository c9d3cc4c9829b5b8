#!/usr/bin/env bash
# Build the Kubernetes the tests, the demo and the benchmarks run on, from the Go module proxy: the control plane
# (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl), the real node (kubelet, kube-proxy), the etcd
# this Kubernetes release names in its build/dependencies.yaml, containerd with its runc shim and ctr (Kubernetes
# 1.36 needs containerd 2.2 or later; Debian bookworm has 1.6), the pause image's binary (build/pause/linux/pause.c),
# the device plugin API definition the simulated Neuron device plugin speaks, and the pod identity webhook EKS runs
# beside its apiservers (IRSA and Pod Identity injection into pods). Installs runc, the CNI plugins, buildah and
# mmdebstrap from Debian.
#
# Needs root on Debian bookworm (it installs packages) and Go (see go.mod's `go` line of the release). Everything
# is cached outside the work tree, so a warm machine builds nothing:
#   ${NEURON_OPERATOR_CACHE:-$HOME/.cache/neuron-model-operator}/kubernetes-v<version>-<key>/{bin,share}
# Go's module and build caches stay in go/ beside it, so a changed recipe rebuilds only what changed. With
# --print-bin-dir it only prints the bin directory (how localcluster finds the binaries); with --print-version, the
# Kubernetes version.
set -euo pipefail

# The one place the versions are named.
KUBERNETES_VERSION=1.36.3
CONTAINERD_VERSION=2.3.7
POD_IDENTITY_WEBHOOK_VERSION=0.6.17

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${NEURON_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/neuron-model-operator}"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy
  etcd containerd containerd-shim-runc-v2 ctr pause amazon-eks-pod-identity-webhook)
# The cache key covers what decides the outputs: this recipe.
key="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
out="$cache/kubernetes-v$KUBERNETES_VERSION-$key"
case "${1:-}" in
  --print-bin-dir) echo "$out/bin"; exit 0 ;;
  --print-version) echo "v$KUBERNETES_VERSION"; exit 0 ;;
esac
packages=(runc containernetworking-plugins iptables conntrack buildah mmdebstrap gcc libc6-dev openssl)
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
  for b in "${binaries[@]}"; do [ -x "$out/bin/$b" ] || return 1; done
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

if [ -n "$todo" ]; then
  log "apt-get update; installing: $todo"
  apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $todo >/dev/null
fi

if built; then
  log "cached: $out"
  exit 0
fi

GO="$(command -v go || echo /usr/local/go/bin/go)"
[ -x "$GO" ] || { log "no Go toolchain found (go on PATH or /usr/local/go/bin/go): install Go 1.26 or later"; exit 1; }
export GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build" GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
work="$cache/go/build-modules"
rm -rf "$cache/build" "$cache/go-build"  # the v1.20 recipe's source tree and Go cache, if this machine had them
staging="$out.tmp"
rm -rf "$staging"
mkdir -p "$work" "$staging/bin" "$staging/share"

# A build module per program: a release's go.mod maps its own sibling modules to local directories, which a
# consuming module must restate as published versions (replace directives of a dependency are ignored).
build_module() {  # name, required module@version, replace lines, link flags, then what to build into $staging/bin
  local name=$1 require=$2 replaces=$3 ldflags=$4
  shift 4
  mkdir -p "$work/$name"
  printf 'module neuron-operator/%s-build\n\ngo %s\n\nrequire %s\n\nreplace (\n%s\n)\n' \
    "$name" "$("$GO" env GOVERSION | sed 's/^go//')" "${require/@/ }" "$replaces" >"$work/$name/go.mod"
  log "building $name ($require): $*"
  local start
  start=$(date +%s)
  (cd "$work/$name" && "$GO" build -ldflags="-s $ldflags" -o "$staging/bin/" "$@") >"$work/$name.log" 2>&1 || {
    tail -n 40 "$work/$name.log" >&2
    log "build of $name failed; full log: $work/$name.log"
    exit 1
  }
  log "built $name in $(($(date +%s) - start)) s"
}

source_dir() {  # module@version -> its source in the module cache (downloaded if needed)
  (cd "$work" && "$GO" mod download -json "$1" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
}

k8s="k8s.io/kubernetes@v$KUBERNETES_VERSION"
k8s_source="$(source_dir "$k8s")"
staged="$(grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$k8s_source/go.mod" | awk '{ print $1 }' | sort -u)"
# The version the binaries report (/version, the node's kubeletVersion; Helm checks a chart's kubeVersion against it),
# as the release's hack/lib/version.sh stamps it; a fixed date keeps the link reproducible.
version_pkg=k8s.io/component-base/version
minor="${KUBERNETES_VERSION#1.}"
build_module kubernetes "$k8s" "$(for m in $staged; do printf '\t%s => %s v0.%s\n' "$m" "$m" "$minor"; done)" \
  "-X $version_pkg.gitVersion=v$KUBERNETES_VERSION -X $version_pkg.gitMajor=1 -X $version_pkg.gitMinor=${minor%%.*} \
   -X $version_pkg.gitTreeState=clean -X $version_pkg.buildDate=1970-01-01T00:00:00Z" \
  k8s.io/kubernetes/cmd/{kube-apiserver,kube-controller-manager,kube-scheduler,kubectl,kubelet,kube-proxy}

# The etcd this release is tested with; its server module maps the other etcd modules to directories too.
etcd_version="$(awk '/- name: "etcd"/ { getline; print $2; exit }' "$k8s_source/build/dependencies.yaml")"
[ -n "$etcd_version" ] || { log "no etcd version in $k8s_source/build/dependencies.yaml"; exit 1; }
build_module etcd "go.etcd.io/etcd/server/v3@v$etcd_version" \
  "$(for m in api/v3 client/pkg/v3 client/v3 pkg/v3; do printf '\tgo.etcd.io/etcd/%s => go.etcd.io/etcd/%s v%s\n' "$m" "$m" "$etcd_version"; done)" \
  "" go.etcd.io/etcd/server/v3
mv "$staging/bin/server" "$staging/bin/etcd"  # go build names it after the module path's last element but /v3

# no_btrfs: the btrfs snapshotter needs cgo and its headers; the node uses overlayfs.
build_module containerd "github.com/containerd/containerd/v2@v$CONTAINERD_VERSION" "" \
  "-X github.com/containerd/containerd/v2/version.Version=v$CONTAINERD_VERSION" -tags no_btrfs \
  github.com/containerd/containerd/v2/cmd/{containerd,containerd-shim-runc-v2,ctr}

# The webhook's module maps nothing to directories; main.webhookVersion is what its --version prints.
build_module pod-identity-webhook "github.com/aws/amazon-eks-pod-identity-webhook@v$POD_IDENTITY_WEBHOOK_VERSION" "" \
  "-X main.webhookVersion=v$POD_IDENTITY_WEBHOOK_VERSION" github.com/aws/amazon-eks-pod-identity-webhook

# The sandbox image's only binary; static, since the image holds nothing else.
gcc -Os -static -o "$staging/bin/pause" -DVERSION="v$KUBERNETES_VERSION-local" "$k8s_source/build/pause/linux/pause.c"
cp "$(source_dir "k8s.io/kubelet@v0.${KUBERNETES_VERSION#1.}")/pkg/apis/deviceplugin/v1beta1/api.proto" "$staging/$proto"
chmod -R u+w "$staging"
rm -rf "$out"
mv "$staging" "$out"
for stale in "$cache"/kubernetes-v*; do  # outputs of an older recipe
  [ "$stale" = "$out" ] || rm -rf "$stale"
done
log "installed: $out (Kubernetes v$KUBERNETES_VERSION, etcd v$etcd_version, containerd v$CONTAINERD_VERSION," \
  "pod identity webhook v$POD_IDENTITY_WEBHOOK_VERSION)"
