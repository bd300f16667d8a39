"""DeepSpeed's checkpoint files read with torch's weights-only unpickler.

DeepSpeed 0.19 reads every file of ``engine.load_checkpoint`` through its checkpoint engine's
``load``, which calls ``torch.load(..., weights_only=False)``: a crafted file in a resumed stage's
checkpoint folder would run code in every worker. Its files hold tensors, plain containers and,
in the ZeRO optimizer state (stages 1-3, fp32 or bf16, with or without CPU offload, measured), three
classes of its own; those three are allowed and nothing else is. (DeepSpeed's universal-checkpoint
loaders call ``torch.load`` themselves; no pipeline turns ``load_universal_checkpoint`` on.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _deepspeed_types() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads(engine) -> Iterator[None]:
    """Within the block, ``engine.load_checkpoint`` unpickles tensors-only: a file holding any
    other object is refused (``pickle.UnpicklingError``) instead of run."""
    allowed = _deepspeed_types()
    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load  # the instance's, for this block only
    try:
        yield
    finally:
        del checkpoint_engine.load
