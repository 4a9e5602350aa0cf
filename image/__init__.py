"""`make image`: the moor node image, built here from Debian packages and the Python registry.

base.py makes the base rootfs with mmdebstrap (no pulled image), engine.py drives a private
podman, build.py stages the build context, builds the repo's Dockerfile on that base and caches
the result by a hash of its inputs. `python -m image` is the command line.
"""
