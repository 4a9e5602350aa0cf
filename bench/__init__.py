"""`make bench`: moor against the reference bridge + host-local CNI plugins, on this host.

Both plugins are driven by the same harness (direct exec with CNI_* env and the netconf on stdin,
prevResult on CHECK/DEL as libcni passes it), interleaved op by op so that machine noise hits
both alike. The figures and their targets go to stdout and to a section of BENCHMARKS.md.
"""
