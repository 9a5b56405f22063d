"""`python -m deltaserve.server [MODEL] [options]`: the same server as `deltaserve serve`."""

from __future__ import annotations

import argparse
import sys

from deltaserve.server.args import ServerConfigError, add_serve_args


def main(argv: list[str] | None = None) -> int:
    parser = add_serve_args(argparse.ArgumentParser(prog="python -m deltaserve.server",
                                                    description="OpenAI-compatible server for Qwen3.5 models"))
    args = parser.parse_args(argv)
    from deltaserve.server.app import run_server

    try:
        return run_server(args)
    except (ValueError, RuntimeError, OSError) as e:  # as `deltaserve serve`: one line (a busy port, a bad model
        # dir or option), not a traceback nor the whole usage text above it
        if not isinstance(e, ServerConfigError) and str(getattr(args, "log_level", "")).lower() in ("debug", "trace"):
            raise
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
