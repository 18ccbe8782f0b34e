"""exo-broker: the cluster's one broker, serving the OpenAI API in-process by default."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click

from exo.broker import protocol as P
from exo.common import logs, parent
from exo.common.paths import exo_home

if TYPE_CHECKING:
    from exo.api.security import Policy
    from exo.broker.broker import Broker
    from exo.common.discovery import Announcer
    from exo.common.keys import Cluster

log = logging.getLogger(__name__)
# A click command (or the function becoming one) that options decorate
Command = TypeVar("Command", bound=Callable[..., Any])


def api_options(f: Command) -> Command:
    """The HTTP API's access options, shared by exo-broker and `exo-tools api`."""
    f = click.option(
        "--api-key",
        "api_keys",
        multiple=True,
        help="A key clients must send (Bearer); repeat for several. Also EXO_API_KEY "
        "(comma-separated). Default: none (keep the API on loopback).",
    )(f)
    f = click.option(
        "--allowed-host",
        "allowed_hosts",
        multiple=True,
        help="A Host name the API answers besides the loopback ones and the address it "
        "is bound to ('*': any).",
    )(f)
    f = click.option(
        "--allowed-origin",
        "allowed_origins",
        multiple=True,
        help="A web origin (scheme://host:port) whose pages may call the API, besides "
        "its own ('*': any).",
    )(f)
    return f


def policy(
    host: str, keys: tuple[str, ...], hosts: tuple[str, ...], origins: tuple[str, ...]
) -> Policy:
    from exo.api.security import LOOPBACK_HOSTS, Policy, host_of, keys_from_env

    all_keys = [*keys, *keys_from_env()]
    bound = [] if host in ("0.0.0.0", "::", "*") else [host_of(host)]
    if host_of(host) not in LOOPBACK_HOSTS and not all_keys:
        log.warning(
            "the API listens on %s with no API key: anyone who can reach it can use it "
            "(--api-key or EXO_API_KEY)",
            host,
        )
    return Policy(keys=all_keys, hosts=[*bound, *hosts], origins=list(origins))


def serve_api(
    broker: str, host: str, port: int, access: Policy | None = None, cluster: Cluster | None = None
) -> None:
    import asyncio

    import uvicorn

    from exo.api.app import create_app

    app = create_app(broker, access, cluster)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Before uvicorn waits for open connections to finish: end every request
            # with an error its client reads, rather than a connection reset.
            if not self.should_exit and loop is not None:
                loop.call_soon_threadsafe(app.state.client.shutting_down)
            super().handle_exit(sig, frame)

    loop: asyncio.AbstractEventLoop | None = None

    async def serve() -> None:
        nonlocal loop
        loop = asyncio.get_running_loop()
        await server.serve()

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="asyncio",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = Server(config)
    log.info("OpenAI API on http://%s:%d/v1", host, port)
    asyncio.run(serve())


@click.command()
@click.option(
    "--host", default="0.0.0.0", show_default=True, help="Interface for the ROUTER and PUB sockets."
)
@click.option("--port", default=P.DEFAULT_ROUTER_PORT, show_default=True, help="ROUTER port.")
@click.option("--pub-port", default=P.DEFAULT_PUB_PORT, show_default=True, help="PUB port.")
@click.option("--api-host", default="127.0.0.1", show_default=True)
@click.option("--api-port", default=P.DEFAULT_API_PORT, show_default=True)
@click.option(
    "--no-api",
    is_flag=True,
    help="Run the broker alone (an API can run elsewhere: exo-tools api --broker tcp://HOST:PORT).",
)
@click.option(
    "--request-timeout",
    default=P.DEFAULT_REQUEST_TIMEOUT_S,
    show_default=True,
    help="Seconds a request may run; clients may ask for less with X-Request-Timeout.",
)
@click.option(
    "--probe-every",
    default=300.0,
    show_default=True,
    help="Seconds between two measurements of the same link (changed links sooner).",
)
@click.option(
    "--announce/--no-announce",
    default=True,
    show_default=True,
    help="Announce the broker on the local network (mDNS, _exo._tcp) so that nodes "
    "started without --broker find it (not when bound to loopback only).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the broker keeps the instances placed by hand, to restore after a restart "
    "(default: ~/.exo/broker).",
)
@api_options
@click.option(
    "--insecure",
    is_flag=True,
    help="No CURVE keys: anyone who reaches the broker's ports may join (a closed lab only).",
)
@click.option("--log", "log_spec", default=None, help='e.g. "info" or "broker=info,api=debug".')
@click.option(
    "--log-file", default=None, help="DEBUG log file (default ~/.exo/logs/broker-PID.log)."
)
def main(
    host: str,
    port: int,
    pub_port: int,
    api_host: str,
    api_port: int,
    no_api: bool,
    request_timeout: float,
    probe_every: float,
    announce: bool,
    state_dir: Path | None,
    api_keys: tuple[str, ...],
    allowed_hosts: tuple[str, ...],
    allowed_origins: tuple[str, ...],
    insecure: bool,
    log_spec: str | None,
    log_file: str | None,
) -> None:
    """Route requests to the cluster's nodes and serve the OpenAI-compatible API."""
    parent.follow_parent()
    logs.setup(log_spec, log_file or logs.default_log_file("broker"))
    from exo.broker.broker import Broker
    from exo.common import keys

    cluster = None if insecure else keys.Cluster.ensure()
    if cluster is None:
        log.warning(
            "--insecure: no keys; anyone who reaches ports %d and %d may join", port, pub_port
        )
    else:
        log.info("cluster keys in %s; a node joins with `exo-tools keys show`", keys.cluster_dir())
    broker = Broker(
        f"tcp://{host}:{port}",
        f"tcp://{host}:{pub_port}",
        request_timeout=request_timeout,
        probe_every=probe_every,
        cluster=cluster,
        journal=(state_dir or exo_home() / "broker") / f"instances-{port}.json",
    )
    announcer = announced(cluster, host, port, pub_port, 0 if no_api else api_port, announce)
    try:
        if no_api:
            signal.signal(signal.SIGTERM, lambda *_: broker.stop_event.set())
            with contextlib.suppress(KeyboardInterrupt):
                broker.run()
            return
        access = policy(api_host, api_keys, allowed_hosts, allowed_origins)
        local = "127.0.0.1" if host in ("0.0.0.0", "*") else host
        with_api(broker, f"tcp://{local}:{port}", api_host, api_port, access, cluster)
    finally:
        if announcer is not None:
            announcer.close()


def with_api(
    broker: Broker, local: str, host: str, port: int, access: Policy, cluster: Cluster | None
) -> None:
    """The broker's loop on a thread, the API in this one (uvicorn takes the signals)."""

    def run() -> None:
        try:
            broker.run()
        except BaseException:
            # The API without its broker would answer 503 for ever: better a process
            # that exits, non-zero, for its supervisor (or `exo-tools up`) to see.
            log.critical("the broker's loop died; exiting", exc_info=True)
            os._exit(70)

    thread = threading.Thread(target=run, name="broker", daemon=True)
    thread.start()
    try:
        serve_api(local, host, port, access, cluster)
    finally:
        broker.stop_event.set()
        thread.join(timeout=2)


def announced(
    cluster: Cluster | None, host: str, port: int, pub_port: int, api_port: int, announce: bool
) -> Announcer | None:
    """The broker's mDNS announcement (common/discovery.py), or None: not asked,
    bound to loopback only, or the network would not take it (said in the log)."""
    from exo.common import discovery

    if not announce or host.startswith("127.") or host in ("localhost", "::1"):
        return None
    try:
        print_ = discovery.fingerprint(cluster.broker.public if cluster is not None else None)
        return discovery.Announcer(print_, port, pub_port, api_port)
    except Exception as e:  # no multicast here, a name clash...: nodes name the broker
        log.warning("could not announce the broker on the local network: %s", e)
        return None


if __name__ == "__main__":
    main()
