"""Ray Train's torch process group: its rendezvous store on 127.0.0.1 on a loopback node, and no
torch in Ray Train's controller.

Rank 0 of every Ray Train worker group hosts torch.distributed's TCPStore at MASTER_ADDR:PORT;
torch binds that server to every interface whatever MASTER_ADDR says (its libuv backend listens
on ``::``), and the store takes unauthenticated writes. Torch's one way to choose the address is a
socket bound beforehand (``TCPStore(master_listen_fd=...)``), which its rendezvous never passes.
:class:`LoopbackTorchConfig` makes the workers pass one bound to 127.0.0.1, when MASTER_ADDR is
127.0.0.1 (the local cluster, ``allinone.cluster.ray``); on a real cluster nothing changes.

The controller process unpickles the config and runs the backend's ``on_start``; Ray's own
``TorchConfig`` lives in a module that imports torch, 1.3 s of every stage's start-up spent in a
process that never touches a tensor. This module imports no torch: what runs on the workers
imports Ray's torch helpers there, where torch is loaded anyway.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import socket
from dataclasses import dataclass

import ray
from ray._private import ray_constants
from ray.exceptions import GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import (
    DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
    TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
)
from ray.train.v2._internal.util import TrainingFramework

LOOPBACK = "127.0.0.1"

logger = logging.getLogger(__name__)


@dataclass
class LoopbackTorchConfig(BackendConfig):
    """Ray's ``TorchConfig`` (same fields, same process group) whose workers host their
    rendezvous store on 127.0.0.1 when their MASTER_ADDR is 127.0.0.1.

    ``backend``: torch.distributed's backend; None picks nccl for workers with GPUs, else gloo.
    """

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend

    @property
    def train_func_context(self):
        # Resolved where the trainer is built; the workers unpickle it with the train function.
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class _LoopbackTorchBackend(Backend):
    """``_TorchBackend.on_start`` for ``init_method="env"``, run from the controller without
    importing torch there."""

    share_cuda_visible_devices = True  # as Ray's torch backend: workers of a node see its GPUs

    def on_start(self, worker_group, backend_config: LoopbackTorchConfig) -> None:
        backend = backend_config.backend or _default_backend(worker_group)
        address, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_prepare_worker, address=address, port=port)
        world = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _join_process_group,
                    backend=backend,
                    world_rank=rank,
                    world=world,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(world)
            ]
        )

    def on_shutdown(self, worker_group, backend_config: LoopbackTorchConfig) -> None:
        futures = worker_group.execute_async(_leave_process_group, destroy=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
        )
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:  # as Ray's: a worker stuck in shutdown does not hold the run
            logger.warning("torch process group shutdown timed out after %s s", timeout_s)


def _default_backend(worker_group) -> str:
    return "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"


# --------------------------------------------------------------------------- on the workers
def _prepare_worker(address: str, port: int) -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    _set_torch_distributed_env_vars()  # RANK, LOCAL_RANK, WORLD_SIZE, ... from Train's context
    bind_stores_to_loopback()


def _join_process_group(backend: str, world_rank: int, world: int, timeout_s: int) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(
        backend=backend,
        world_rank=world_rank,
        world_size=world,
        init_method="env://",
        timeout_s=timeout_s,
    )


def _leave_process_group(destroy: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy)


def bind_stores_to_loopback() -> None:
    """In a worker: rendezvous stores hosted on 127.0.0.1 listen on 127.0.0.1 only."""
    # `torch.distributed.rendezvous` names the function; the module is the one the store is
    # created in (`_create_c10d_store` calls this module's TCPStore).
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    if not isinstance(rendezvous.TCPStore, functools.partial):
        rendezvous.TCPStore = functools.partial(_store, rendezvous.TCPStore)


def _store(store_class, *args, **kwargs):
    hosted_here = kwargs.get("is_master") and "master_listen_fd" not in kwargs
    if hosted_here and not args and kwargs.get("host_name") == LOOPBACK:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((LOOPBACK, kwargs["port"]))
        listener.listen()
        kwargs["master_listen_fd"] = listener.detach()  # the store owns it from here
    return store_class(*args, **kwargs)
