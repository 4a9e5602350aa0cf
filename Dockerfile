# moor node image (first version): moor-ipamd plus the CNI payload an init container copies to the host.
# Run as a DaemonSet with hostNetwork, privileged, and /run/moor, /var/lib/moor, /opt/cni/bin and
# /etc/cni/net.d mounted from the host. The shim needs only a Python 3 on the host: its shebang is
# /usr/bin/python3 -SE (Debian/Ubuntu hosts have it).
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv iptables iproute2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/moor
COPY setup.cfg pyproject.toml README.md ./
COPY cni_plugin ./cni_plugin
COPY ipamd ./ipamd
COPY bin ./bin
COPY conf ./conf
RUN python3 -m venv /opt/moor/venv \
 && /opt/moor/venv/bin/pip install --no-cache-dir . \
 && install -m 0755 bin/moor /opt/moor/payload-moor
# Init container: cp /opt/moor/payload-moor /host/opt/cni/bin/moor && cp conf/10-moor.conflist /host/etc/cni/net.d/
ENTRYPOINT ["/opt/moor/venv/bin/moor-ipamd"]
CMD ["--config", "/etc/moor/ipamd.yaml"]
