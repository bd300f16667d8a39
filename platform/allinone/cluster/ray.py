"""Starting or joining a Ray cluster for a run, with one clear error when it does not answer."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

# Trainer and data readers share the cores: idle OpenMP threads must sleep, not spin (spinning
# threads slowed the tiny models 5-20x when another process was busy, measured on 2 cores).
# Ray Train's print patch would echo every progress line twice on the driver. Its controller
# polls the workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a stage's end, and
# each checkpoint a worker waits to see registered, cost up to one poll; at 0.5 s a one-worker
# stage returned 1.7 s sooner after its last step (mean of 4), for a poll costing milliseconds.
WORKER_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# A cluster of this machine alone is not preempted: Ray Train's preemption watcher would be one
# more actor process to start with every stage.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class ClusterError(RuntimeError):
    """A Ray address that does not answer."""


def start_ray(address: str | None) -> None:
    """Join the given cluster, the job's cluster (RAY_ADDRESS), or start a local one."""
    import ray

    if ray.is_initialized():  # a study's trial, or a caller that started Ray itself
        quiet_ray_data()
        return
    for name, value in WORKER_ENV.items():  # Ray Train hands these on to its controller and workers
        os.environ.setdefault(name, value)
    check_ray_address(address)
    target = address or os.environ.get("RAY_ADDRESS")
    try:
        if target:
            # A cluster listening on 127.0.0.1 only (another process's local one) is joined as a
            # loopback node too: ray.init would look for it at this machine's network address.
            with _loopback_node() if _loopback_only(target) else nullcontext():
                ray.init(address=address, log_to_driver=True)
        else:
            _start_local()
    except (ConnectionError, TimeoutError, RuntimeError) as err:
        raise ClusterError(
            f"Ray cluster at {address or os.environ.get('RAY_ADDRESS')} "
            f"does not answer: {str(err).splitlines()[0]}"
        ) from None
    quiet_ray_data()


def _start_local() -> None:
    """A one-machine cluster reachable from this machine only, ending with this process."""
    import psutil
    import ray

    for name, value in LOCAL_ENV.items():
        os.environ.setdefault(name, value)
    before = {child.pid for child in psutil.Process().children()}
    # Spare logical CPUs for Ray Data's readers: on 2 cores a 2-worker trainer would otherwise
    # take every CPU and the stream would starve.
    cores = os.cpu_count() or 2
    dashboard = _free_port()
    with _loopback_node():
        ray.init(
            address="local",
            num_cpus=max(4, 2 * cores),
            # The dashboard serves Ray's State API: without it Ray Train's placement-group
            # cleaner warns every second that it cannot see its controller.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard,
            runtime_env={"env_vars": {**WORKER_ENV, **LOCAL_ENV, **state_api_env(dashboard)}},
        )
    heads = [child.pid for child in psutil.Process().children() if child.pid not in before]
    _start_reaper(heads)


def state_api_env(dashboard_port: int) -> dict[str, str]:
    """Where this cluster's State API is, for its worker processes. Ray Train's placement-group
    cleaner asks the State API whether its controller lives; unaddressed, the API looks for "the"
    Ray instance of the machine, and with a second one running (another user's, a test's) its
    thread dies with a 25-line traceback, leaving the group uncleaned should the controller die."""
    return {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Ray binds its gRPC servers (GCS, raylet, every worker) to 127.0.0.1 only when the node's address
# is 127.0.0.1, and its agents and metrics exporters listen on the node's address. ray.init turns
# 127.0.0.1 into the machine's network address unless it believes multi-node clusters are off:
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read into ray_constants.ENABLE_RAY_CLUSTER when ray is
# imported (ray._private.services.get_node_ip_address). Every process ray.init starts inherits the
# variable; this process sets it only while starting them, so that joining a real cluster later
# (`ray start --address`, a driver elsewhere) still works.
_SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_only(address: str) -> bool:
    """Whether ``address`` is on 127.0.0.1 and its port does not answer at this machine's
    network address (a `ray start` cluster listens on both, and is joined as usual)."""
    from ray.util import get_node_ip_address

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        loopback = host.strip("[]") == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "auto"
        return False
    return loopback and port.isdigit() and bool(unreachable(get_node_ip_address(), int(port), 2))


@contextmanager
def _loopback_node() -> Iterator[None]:
    from ray._private import ray_constants

    previous_env, previous = os.environ.get(_SINGLE_NODE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_NODE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous
        if previous_env is None:
            os.environ.pop(_SINGLE_NODE, None)
        else:
            os.environ[_SINGLE_NODE] = previous_env


_reaper: subprocess.Popen | None = None  # held: a collected Popen of a live child warns


def _start_reaper(heads: list[int]) -> None:
    """Kill what is left of the local cluster once this process dies (``cluster/reaper.py``).
    In its own session: a Ctrl-C or ``kill`` of this process group must not take it first."""
    global _reaper
    _reaper = subprocess.Popen(
        [sys.executable, "-m", "allinone.cluster.reaper", str(os.getpid()), *map(str, heads)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def check_ray_address(address: str | None) -> None:
    """The cluster a run will join (``--address``, else $RAY_ADDRESS) answers, if there is one."""
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target != "auto":
        check_reachable(target)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when nothing listens at a Ray address (``ray.init`` would wait minutes)."""
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not host:port (e.g. 10.0.0.1:6379)")
    refusal = unreachable(host, int(port), timeout_s)
    if refusal:
        raise ClusterError(f"Ray cluster at {address} does not answer ({refusal})")


def unreachable(host: str, port: int, timeout_s: float = 5.0) -> str | None:
    """Why nothing answers at ``host:port`` within the timeout, or None when something does."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return str(err.strerror or err)
    return None


def quiet_ray_data() -> None:
    """Our own progress lines say stage, step, loss and samples/s; Ray Data's bars would bury them.
    The context travels with each dataset to the processes that execute it."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
