"""Ray Train's torch process group, with its rendezvous store on 127.0.0.1 on a loopback node.

Rank 0 of every Ray Train worker group hosts torch.distributed's TCPStore at MASTER_ADDR:PORT;
torch binds that server to every interface whatever MASTER_ADDR says (its libuv backend listens
on ``::``), and the store takes unauthenticated writes. Torch's one way to choose the address is a
socket bound beforehand (``TCPStore(master_listen_fd=...)``), which its rendezvous never passes.
:class:`LoopbackTorchConfig` makes the workers pass one bound to 127.0.0.1, when MASTER_ADDR is
127.0.0.1 (the local cluster, ``allinone.cluster.ray``); on a real cluster nothing changes.
"""

from __future__ import annotations

import functools
import importlib
import socket
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

LOOPBACK = "127.0.0.1"


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


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(bind_stores_to_loopback)
        super().on_start(worker_group, backend_config)


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose workers host their rendezvous store on 127.0.0.1 when their
    MASTER_ADDR is 127.0.0.1."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
