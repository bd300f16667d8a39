"""Starting or joining a Ray cluster for a run, with one clear error when it does not answer."""

from __future__ import annotations

import os
import socket

# Trainer and data readers share the cores: idle OpenMP threads must sleep, not spin (spinning
# threads slowed the tiny models 5-20x when another process was busy, measured on 2 cores).
# Ray Train's print patch would echo every progress line twice on the driver.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


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
    try:
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address, log_to_driver=True)
        else:
            # Spare logical CPUs for Ray Data's readers: on 2 cores a 2-worker trainer would
            # otherwise take every CPU and the stream would starve.
            cores = os.cpu_count() or 2
            ray.init(
                address="local",
                num_cpus=max(4, 2 * cores),
                # The dashboard serves Ray's State API: without it Ray Train's placement-group
                # cleaner warns every second that it cannot see its controller.
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                runtime_env={"env_vars": WORKER_ENV},
            )
    except (ConnectionError, TimeoutError, RuntimeError) as err:
        raise ClusterError(
            f"Ray cluster at {address or os.environ.get('RAY_ADDRESS')} "
            f"does not answer: {str(err).splitlines()[0]}"
        ) from None
    quiet_ray_data()


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
