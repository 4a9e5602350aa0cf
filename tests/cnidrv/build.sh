#!/bin/sh
# Build tests/cnidrv/cnidrv offline against Debian's libcni (golang-github-appc-cni-dev).
# Idempotent: does nothing while the binary is newer than main.go and go.mod.
# Needs: apt-get install golang-go golang-github-appc-cni-dev
set -eu

here=$(cd "$(dirname "$0")" && pwd)
bin="$here/cnidrv"
libcni=/usr/share/gocode/src/github.com/containernetworking/cni

if [ -x "$bin" ] && [ "$bin" -nt "$here/main.go" ] && [ "$bin" -nt "$here/go.mod" ]; then
    exit 0
fi

command -v go >/dev/null 2>&1 || { echo "build.sh: 'go' not found (apt-get install golang-go)" >&2; exit 1; }
[ -f "$libcni/libcni/api.go" ] || {
    echo "build.sh: libcni sources missing at $libcni (apt-get install golang-github-appc-cni-dev)" >&2
    exit 1
}

# Everything Go writes stays in one gitignored directory next to the sources.
export GOCACHE="$here/.gocache/build"
export GOPATH="$here/.gocache/gopath"
export GOMODCACHE="$GOPATH/pkg/mod"
export GOPROXY=off GOFLAGS=-mod=mod GOTOOLCHAIN=local GOWORK=off GO111MODULE=on GOSUMDB=off CGO_ENABLED=0

cd "$here"
tmp="$bin.tmp.$$"
trap 'rm -f "$tmp"' EXIT
if ! go build -trimpath -o "$tmp" .; then
    echo "build.sh: go build of cnidrv failed" >&2
    exit 1
fi
mv -f "$tmp" "$bin"
