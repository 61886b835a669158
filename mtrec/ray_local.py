"""Ray on loopback only: the settings that keep an embedded Ray instance off the network.

An embedded instance (``ray.init(address="local")``) starts a GCS server, a raylet, a
dashboard agent (with the job-submission HTTP endpoint), a runtime-env agent and worker
processes, each listening on a TCP port. On Linux Ray treats ``127.0.0.1`` as "this node"
and replaces it with the machine's external address, so those services listen on every
interface unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is seen by Ray — and Ray reads that
variable once, when ``ray`` is first imported. :func:`use_loopback` handles both orders
(before and after the import); :func:`loopback_init_kwargs` is the rest of the recipe::

    from mtrec.ray_local import loopback_init_kwargs, use_loopback

    use_loopback()
    import ray

    ray.init(num_cpus=2, **loopback_init_kwargs())

Ray is imported only by the caller: importing this module costs nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = [
    "LOOPBACK",
    "LOOPBACK_ENV",
    "loopback_init_kwargs",
    "serve_replica_on_loopback",
    "use_loopback",
]

LOOPBACK = "127.0.0.1"

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Environment an embedded Ray needs to keep 127.0.0.1 as its node address."""


def use_loopback() -> None:
    """Make the next embedded Ray instance bind its services to 127.0.0.1.

    Sets :data:`LOOPBACK_ENV` (overriding: an embedded instance on the external interface
    is never wanted) for this process and the Ray processes it starts; when ``ray`` was
    already imported, also its constant that was read from the variable at import time.
    """
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def loopback_init_kwargs() -> dict[str, Any]:
    """``ray.init`` arguments for a fresh embedded instance on loopback, no dashboard.

    ``address="local"`` starts a new instance even when another one runs on this machine;
    the dashboard agent and its job endpoint still run (Ray needs them) and listen on
    ``_node_ip_address``. Call :func:`use_loopback` first.
    """
    return {
        "address": "local",
        "include_dashboard": False,
        "dashboard_host": LOOPBACK,
        "_node_ip_address": LOOPBACK,
    }


def serve_replica_on_loopback() -> bool:
    """In a Ray Serve replica of a loopback-only instance, make the replica's
    inter-deployment gRPC server listen on 127.0.0.1 instead of every interface.

    Ray Serve 2.58 binds that server to ``[::]:0`` whatever the node address (no option
    changes it). Call this from the deployment's constructor: Serve starts the server
    right after the constructor returns. Does nothing (returns False) on a node whose
    address is not loopback, where other nodes must reach the replica.
    """
    import ipaddress

    import ray
    from ray.serve._private import replica

    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return False
    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback_only", False):
        return True

    def bind_loopback(server: Any, address: str) -> int:
        host, _, port = address.rpartition(":")
        return bind(server, f"{LOOPBACK}:{port}" if host in ("[::]", "0.0.0.0") else address)

    bind_loopback.loopback_only = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind_loopback
    return True
