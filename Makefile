# moor: every target installs what it needs first (apt packages, the venv, the libcni driver),
# idempotently, so `make demo` and `make test` work on a fresh Debian machine as root.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM_PYTHON := /usr/bin/python3
APT_PACKAGES := python3-venv containernetworking-plugins etcd-server etcd-client golang-go openssl \
	golang-github-appc-cni-dev iptables iproute2 iperf3 podman runc busybox-static mmdebstrap
PROTO := ipamd/api/v1/ipam.proto
CNIDRV := tests/cnidrv/cnidrv
# The static CNI shim (Go, shim/): what the node image installs as /opt/cni/bin/moor.
STATIC_SHIM := build/moor
STORE ?= sqlite
CLUSTER ?=
BACKEND ?=

.PHONY: deps apt venv cnidrv shim test lint fmt proto proto-check demo bench image clean

deps: apt venv cnidrv shim

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The venv is Debian's interpreter (the pyenv build on PATH is slower and its `python3` is a shim).
$(VENV)/.installed: setup.cfg pyproject.toml
	@[ -x $(PY) ] || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: apt $(VENV)/.installed

cnidrv: apt
	@tests/cnidrv/build.sh

# build/moor: static, CGO off, built offline; idempotent (rebuilt only when shim/ is newer).
shim: apt
	@shim/build.sh

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	@unformatted=$$(gofmt -l shim tests/cnidrv); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi

fmt: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
	gofmt -w shim tests/cnidrv

# Generated stubs are committed; `proto-check` fails when they are stale.
proto: venv
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)

proto-check: venv
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(PY) -m grpc_tools.protoc -I . --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO) && \
	for f in ipam_pb2.py ipam_pb2.pyi ipam_pb2_grpc.py; do \
		diff -q $$tmp/ipamd/api/v1/$$f ipamd/api/v1/$$f >/dev/null || \
		{ echo "ipamd/api/v1/$$f is stale: run 'make proto' and commit"; exit 1; }; \
	done; echo "gRPC stubs are current"

test: deps lint proto-check
	$(PY) -m pytest

demo: deps
	$(PY) -m demo --store $(STORE) $(if $(CLUSTER),--cluster $(CLUSTER)) $(if $(BACKEND),--backend $(BACKEND))

bench: deps
	$(PY) -m bench

# The node image from the Dockerfile, on a Debian base made here (image/): built once, then reused
# while its inputs are unchanged. Cache: $${MOOR_IMAGE_CACHE:-/var/tmp/moor-image} (see README).
image: apt shim
	$(SYSTEM_PYTHON) -m image --archive

clean:
	rm -rf $(VENV) $(CNIDRV) tests/cnidrv/.gocache $(STATIC_SHIM) build/.gocache .pytest_cache \
		.ruff_cache .hypothesis
