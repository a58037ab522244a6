"""Read a close policy the way a service would: environment first, then its config file.

    APP_CLOSE_POLICY="abort" python docs/examples/policy_from_config.py

The config file here is a TOML string; a real service would read its file with
tomllib.load(). A bad setting stops the service at start-up with one clear line,
instead of surfacing at the first close.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib

import tcpclose

CONFIG = """
[server]
port = 8080

[server.close]
mode = "peer-first"
timeout = "3s"
fallback = "auto"
linger_time = 10
"""


def load_policy(environ: dict[str, str]) -> tcpclose.ClosePolicy:
    """APP_CLOSE_POLICY (one line of text) wins; otherwise [server.close] from the config."""
    config = tomllib.loads(CONFIG)
    return tcpclose.ClosePolicy.from_env(
        "APP_CLOSE_POLICY", default=config["server"]["close"], environ=environ
    )


def main() -> int:
    try:
        policy = load_policy(dict(os.environ))
    except tcpclose.PolicyError as exc:  # a ValueError: one line, no traceback
        print(f"bad close policy: {exc}", file=sys.stderr)
        return 2
    print(f"close policy: {policy}")
    print(f"as JSON:      {json.dumps(policy.as_dict())}")
    assert tcpclose.ClosePolicy.parse(str(policy)) == policy  # the text round-trips

    # What an operator's typo looks like:
    try:
        load_policy({"APP_CLOSE_POLICY": "peer-first timout=5s"})
    except tcpclose.PolicyError as exc:
        print(f"a typo:       {exc}")
        print(f"              the offending word: {exc.word!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
