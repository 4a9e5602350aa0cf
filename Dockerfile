# The moor node image: moor-ipamd (the entrypoint) and the CNI payload an installer copies to the
# host. Build it with `make image` (image/build.py): the base is a Debian rootfs made by mmdebstrap
# and `podman import`ed as localhost/moor-base:bookworm-<recipe> (image/base.py), never a pulled
# image; Python packages come from the package index. By hand, after one `make image` (which
# prints the base tag), from the repo root:
#   podman build --network host --build-arg BASE=<base tag> -t moor-node .
# Behind a TLS proxy, give pip the host's CA bundle:
#   -v /etc/ssl/certs/ca-certificates.crt:/ca.crt:ro --build-arg PIP_CERT=/ca.crt
#
# Run as a DaemonSet container: host network; capabilities NET_ADMIN (links, routes, iptables) and
# SYS_ADMIN (setns into pod netns), NET_RAW for a netconf's arpProbe (runtimes' defaults have it);
# a writable /proc/sys, which a container does not get whatever its capabilities (the bridge
# datapath writes sysctls: a new bridge's accept_ra, ip_forward, fixed pods' proxy_arp): in
# Kubernetes that takes `privileged`, in podman `--security-opt unmask=/proc/sys`; host mounts
# /run/moor (its sockets: the shim and moorctl talk to them), /var/lib/moor (state, and the DEL
# spool the host's shim writes to). It takes flags or `--config FILE`; without either it runs the
# defaults (node name = hostname, SQLite store in /var/lib/moor, 10.244.0.0/16 in /24s).
#
# /opt/moor/cni/ is the CNI payload the DaemonSet's init container installs in /opt/cni/bin: the
# static shim `moor` (build/moor, `make shim`: one self-contained executable, no Python needed on
# the host). /etc/moor/10-moor.conflist is the sample network config.
ARG BASE=localhost/moor-base:bookworm

FROM ${BASE} AS build
# PIP_CERT: a CA bundle the build mounts read-only (the host's: the index may be reached through a
# TLS proxy the host trusts); it is not part of any layer.
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The dependencies first, from setup.cfg alone, so a change of moor's sources reuses this layer.
COPY setup.cfg /src/setup.cfg
RUN python3 -c "import configparser as c; p = c.ConfigParser(); p.read('/src/setup.cfg'); \
print(p['options']['install_requires'])" > /src/requirements.txt \
 && python3 -m venv /opt/moor/venv \
 && /opt/moor/venv/bin/pip install --quiet ${PIP_CERT:+--cert "$PIP_CERT"} \
      -r /src/requirements.txt "setuptools>=61" wheel
COPY pyproject.toml README.md /src/
COPY cni_plugin /src/cni_plugin
COPY ipamd /src/ipamd
RUN /opt/moor/venv/bin/pip install --quiet --no-deps --no-build-isolation /src \
 && /opt/moor/venv/bin/pip uninstall --quiet --yes pip setuptools wheel

FROM ${BASE}
COPY --from=build /opt/moor/venv /opt/moor/venv
COPY build/moor /opt/moor/cni/moor
COPY conf/10-moor.conflist /etc/moor/10-moor.conflist
ENV PATH=/opt/moor/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONUNBUFFERED=1
# Fail the build, not the node, when the base lacks a library a wheel's extension links.
RUN PYTHONDONTWRITEBYTECODE=1 /opt/moor/venv/bin/python -c "import ipamd.daemon, ipamd.cli"
ENTRYPOINT ["/opt/moor/venv/bin/moor-ipamd"]
