"""`retro-peft serve`: the OpenAI-compatible HTTP server (see retro_peft.serving and docs/serving.md)."""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve domains over an OpenAI-compatible HTTP API")
    p.add_argument("--config", help="YAML or TOML settings file (every setting can also come from RETRO_PEFT_* "
                                    "environment variables); without one, every registered domain is served")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--workers", type=int, help="worker processes, each with its own copy of the model (default 1)")
    p.add_argument("--no-auth", action="store_true",
                   help="serve without any authentication (refused unless asked for; logs a warning)")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import uvicorn

    from retro_peft.serving import logs
    from retro_peft.serving.auth import Authenticator
    from retro_peft.serving.settings import EVENT_LOOP, load_settings

    if args.no_auth:
        os.environ["RETRO_PEFT_AUTH__ALLOW_UNAUTHENTICATED"] = "true"
    settings = load_settings(args.config, host=args.host, port=args.port, workers=args.workers)
    # Fail here, with a one-line message, rather than in every worker.
    Authenticator(settings.auth, settings.api_keys.get_secret_value() if settings.api_keys else None)
    logs.configure(settings.log_level, settings.log_json)
    if args.config:  # the workers re-read the settings from the environment and this file
        os.environ["RETRO_PEFT_SERVE_CONFIG"] = os.path.abspath(args.config)
    uvicorn.run("retro_peft.serving.app:create_app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, loop=EVENT_LOOP, log_config=None, access_log=False,
                log_level=settings.log_level, timeout_graceful_shutdown=settings.graceful_shutdown_s or None,
                proxy_headers=True)
    return 0
