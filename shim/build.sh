#!/bin/sh
# Build build/moor, the static CNI shim (shim/*.go), offline with Debian's golang-go.
# Idempotent: does nothing while the binary is newer than every source file.
# Usage: shim/build.sh [OUTPUT [TAGS]]   (tests build a `shimfault` variant elsewhere)
# Needs: apt-get install golang-go
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out="$repo/build"
bin="${1:-$out/moor}"
tags="${2:-}"

fresh=1
[ -x "$bin" ] || fresh=0
for src in "$here"/*.go "$here/go.mod" "$here/build.sh"; do
    [ "$fresh" = 1 ] && [ "$bin" -nt "$src" ] || fresh=0
done
[ "$fresh" = 1 ] && exit 0

command -v go >/dev/null 2>&1 || { echo "shim/build.sh: 'go' not found (apt-get install golang-go)" >&2; exit 1; }

# Everything Go writes stays in the gitignored build/ directory.
mkdir -p "$out" "$(dirname "$bin")"
export GOCACHE="$out/.gocache/build"
export GOPATH="$out/.gocache/gopath"
export GOMODCACHE="$GOPATH/pkg/mod"
export GOPROXY=off GOFLAGS=-mod=mod GOTOOLCHAIN=local GOWORK=off GO111MODULE=on GOSUMDB=off
# No cgo: one static executable that needs nothing on the host, not even a C library.
export CGO_ENABLED=0

cd "$here"
tmp="$bin.tmp.$$"
trap 'rm -f "$tmp"' EXIT
if ! go build -trimpath -buildvcs=false -ldflags="-s -w" -tags "$tags" -o "$tmp" .; then
    echo "shim/build.sh: go build of the static shim failed" >&2
    exit 1
fi
mv -f "$tmp" "$bin"
