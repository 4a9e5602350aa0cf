"""`python -m image` (`make image`): build the node image, or reuse the cached one; print where.

Exit status: 0 built or reused, 1 the build failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys

from image import base, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m image", description=__doc__)
    parser.add_argument("--rebuild", action="store_true", help="build without any layer cache")
    parser.add_argument(
        "--archive", action="store_true", help="also write a docker-archive tarball to the cache"
    )
    args = parser.parse_args(argv)
    ok, why = base.available()
    if not ok:
        print(f"make image: {why}", file=sys.stderr)
        return 1
    try:
        built = build.ensure_image(rebuild=args.rebuild)
        archive = build.save_archive(built) if args.archive else None
    except RuntimeError as exc:
        print(f"make image: {exc}", file=sys.stderr)
        return 1
    how = "reused (cached)" if built.cached else "built"
    print(f"{built.tag} {how} in {built.seconds:.1f} s, {built.size / 1e6:.1f} MB")
    state = built.store.parent / "state"
    env = f"CONTAINERS_CONF={state}/containers.conf CONTAINERS_STORAGE_CONF={state}/storage.conf"
    print(f"storage: {env} podman images")
    print(f"base: {base.image_tag()} (the Dockerfile's BASE)")
    if archive:
        print(f"archive: {archive} (podman load -i / docker load -i / ctr images import)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
