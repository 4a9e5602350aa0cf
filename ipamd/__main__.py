"""`moor-ipamd` / `python -m ipamd`: parse the config, start the daemon, serve until signalled."""

from __future__ import annotations

import logging
import sys

from ipamd import logs
from ipamd.config import load_config


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except (ValueError, OSError) as exc:
        print(f"moor-ipamd: {exc}", file=sys.stderr)
        return 2
    logs.configure(cfg.log_level, cfg.log_format)
    from ipamd.daemon import Daemon  # heavy imports (pyroute2, grpc) only once the config is good

    # pyroute2 resets its logger on import; its debug output is every netlink message in full
    logging.getLogger("pyroute2").setLevel(max(logging.INFO, logging.root.level))

    daemon = Daemon(cfg)
    try:
        daemon.start()
    except Exception as exc:
        logging.getLogger("moor-ipamd").error(
            "start-up failed: %s", exc, exc_info=cfg.log_level == "debug"
        )
        daemon.stop()
        return 1
    daemon.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
