"""Ray start-up, in one place for distributed training and parallel evaluation.

Without an address (and without ``$RAY_ADDRESS``) an embedded instance is started on
127.0.0.1 with no dashboard; with one, the caller joins that cluster. Ray is imported
only inside these functions: importing this module costs nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from mtrec.errors import ClusterError
from mtrec.ray_local import loopback_init_kwargs, use_loopback

__all__ = [
    "RAY_ENV",
    "check_reachable",
    "cluster_address",
    "connect",
    "ray_session",
    "set_ray_env",
    "start_local_ray",
]

# Set before Ray is imported or started (see shared/STACK.md): keep Ray on loopback,
# make ray.train.report cheap (~0.1 s instead of ~1.8 s), and show every worker's log
# lines (Ray otherwise folds lines that differ only in numbers, e.g. the rank).
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_DEDUP_LOGS": "0",
}


def set_ray_env() -> None:
    """Put :data:`RAY_ENV` into the environment (values already set are kept)."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster to join: ``address``, else ``$RAY_ADDRESS``, else None (embedded).

    ``http(s)://`` is the job server's address (what ``ray job`` commands take), not one
    to run on: given explicitly it is an error; in ``$RAY_ADDRESS`` it is ignored.
    """
    if address and address.startswith(("http://", "https://")):
        raise ClusterError(
            f"--address {address}: that is the Ray job server (dashboard) address; pass the "
            "cluster's HOST:PORT (e.g. 127.0.0.1:6379), or submit with `ray job submit`"
        )
    if address:
        return address
    env = os.environ.get("RAY_ADDRESS") or None
    if env and env.startswith(("http://", "https://")):
        return None
    return env


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast (a TCP connect, no Ray involved) when ``host:port`` does not answer."""
    if address == "auto" or address.startswith(("local", "anyscale://")):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"--address {address!r}: expected HOST:PORT of a Ray head node "
            "(e.g. 127.0.0.1:6379, or ray://HOST:10001)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head --node-ip-address=127.0.0.1 --port=6379`, fix --address / "
            "RAY_ADDRESS, or leave both unset to run in an embedded local instance"
        ) from None


def connect(address: str, log_to_driver: bool = True) -> None:
    """Join the Ray cluster at ``address``; a :class:`ClusterError` when that fails."""
    import ray

    try:
        ray.init(address=address, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(
            f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}"
        ) from None


def start_local_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Start an embedded Ray instance on 127.0.0.1 (no dashboard), with the settings
    distributed training needs; ``num_cpus`` defaults to this process's CPUs."""
    set_ray_env()
    use_loopback()  # also when something imported Ray before this call
    import ray

    ray.init(
        num_cpus=num_cpus or len(os.sched_getaffinity(0)),
        **loopback_init_kwargs(),
        log_to_driver=log_to_driver,
        configure_logging=log_to_driver,
    )


@contextmanager
def ray_session(address: str | None, num_cpus: int, log_to_driver: bool = False) -> Iterator[None]:
    """Ray for the duration of the block: reuse an already connected session (left open),
    else join ``address`` / ``$RAY_ADDRESS`` or start an embedded instance with
    ``num_cpus`` CPUs (either one closed on exit)."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = cluster_address(address)
    if address:
        check_reachable(address)
        connect(address, log_to_driver=log_to_driver)
    else:
        start_local_ray(num_cpus, log_to_driver=log_to_driver)
    try:
        yield
    finally:
        ray.shutdown()
