"""Running the service under uvicorn: what ``hsm-auth serve`` calls.

The listening socket is bound here, before uvicorn starts, so that ``--listen
HOST:0`` works (the real address is announced) and every worker process shares
it. One worker runs in this process; ``workers > 1`` runs uvicorn's supervisor,
whose children build the app from :data:`~hsm_auth.service.context.SETTINGS_ENV`
(:func:`~hsm_auth.service.app.create_app_from_env`), which this process sets for
them: a DSN never goes on a command line. Several workers need PostgreSQL (each
worker's Verifier has its own connection; they agree through the database).

Logging: one handler on stderr for uvicorn's and hsm-auth's loggers
(``name: message``), set up in every worker. uvicorn's access log is off unless
asked for: its lines carry paths and query strings (user names), never a body or
a header, so never an API key or an OTP.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InvalidInput
from ..store.postgres import is_postgres_dsn
from .context import SETTINGS_ENV, ServiceSettings

__all__ = ["Listen", "parse_listen", "serve"]


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


def parse_listen(text: str) -> Listen:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; port 0: any free port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidInput("--listen takes HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidInput("--listen [HOST]:PORT takes an IPv6 address") from None
    return Listen(host, int(port_text))


def check_settings(settings: ServiceSettings) -> None:
    if settings.workers < 1 or settings.workers > 64:
        raise InvalidInput("--workers takes 1 to 64")
    if settings.workers > 1 and not (settings.database and is_postgres_dsn(settings.database)):
        raise ConfigError(
            "--workers above 1 needs a PostgreSQL database (--database postgresql://…): "
            "the workers agree through it"
        )
    if settings.max_body < 1024:
        raise InvalidInput("--max-body is at least 1024 bytes")


def _bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(listen.host, listen.port, family, socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, IndexError) as e:
        raise InvalidInput(f"cannot listen on {listen.host}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        raise InvalidInput(f"cannot listen on {listen.host}:{listen.port}: {e.strerror}") from None
    return sock


def log_config(access_log: bool) -> dict[str, Any]:
    handler = {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(name)s: %(message)s"}},
        "handlers": {"stderr": handler},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn.access": {
                "handlers": ["stderr"],
                "level": "INFO" if access_log else "WARNING",
                "propagate": False,
            },
            "hsm_auth": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        },
    }


def serve(
    settings: ServiceSettings,
    listen: Listen,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    access_log: bool = False,
    proxy_headers: bool = False,
    forwarded_allow_ips: str | None = None,
    announce: Callable[[str], None] = lambda url: None,
) -> None:
    """Serve until SIGTERM / SIGINT. ``announce`` gets the base URL once bound."""
    import uvicorn

    check_settings(settings)
    if (tls_cert is None) != (tls_key is None):
        raise InvalidInput("--tls-cert and --tls-key go together")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise InvalidInput(f"no such file: {str(path)[:200]}")
    from .app import close_context, create_app, open_context

    # Open it once here: a missing verifier or an unreachable database is one error
    # line from the CLI, not a failed start-up in each worker.
    close_context(open_context(settings))
    options: dict[str, Any] = {
        "log_config": log_config(access_log),
        "access_log": access_log,
        "proxy_headers": proxy_headers,
        "server_header": False,
        "timeout_graceful_shutdown": 10,
        "ssl_certfile": str(tls_cert) if tls_cert else None,
        "ssl_keyfile": str(tls_key) if tls_key else None,
    }
    if forwarded_allow_ips is not None:
        options["forwarded_allow_ips"] = forwarded_allow_ips
    sock = _bind(listen)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls_cert else 'http'}://{shown}:{port}"
    try:
        if settings.workers == 1:
            config = uvicorn.Config(create_app(settings=settings), **options)
            server = uvicorn.Server(config)
            announce(url)
            server.run(sockets=[sock])
            return
        os.environ[SETTINGS_ENV] = settings.to_env()
        config = uvicorn.Config(
            "hsm_auth.service.app:create_app_from_env",
            factory=True,
            workers=settings.workers,
            **options,
        )
        from uvicorn.supervisors import Multiprocess

        announce(url)
        supervisor: Any = Multiprocess  # uvicorn < 0.36 takes the server's run as target
        if "target" in inspect.signature(Multiprocess.__init__).parameters:
            supervisor(config, target=uvicorn.Server(config).run, sockets=[sock]).run()
        else:
            supervisor(config, sockets=[sock]).run()
    finally:
        sock.close()
