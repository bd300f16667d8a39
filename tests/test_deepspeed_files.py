"""DeepSpeed's engine as a worker builds it: a real resume works under ZeRO 0, 2 and 3 and reads
its files tensors-only (a crafted pickle in their place is refused unrun), and the frozen parts
that pretrained files supply stay out of what ZeRO-3 partitions."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

# One process, world size 1 over gloo, as a Ray Train worker on a CPU (a fresh process: the
# process group must not outlive the test). argv: port, folder, marker.
SCRIPT = """
import json, os, pickle, sys
import torch, torch.distributed as dist

port, root, marker = sys.argv[1:]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
from allinone.train.loop import DS_TAG, _build_ops_as_make_does, _restore

_build_ops_as_make_does()  # the op make built is the one loaded, as in a worker
import deepspeed, ray.train

dist.init_process_group("gloo")


class Payload:  # unpickling it would create the marker: code hidden in a checkpoint file
    def __reduce__(self):
        return open, (marker, "w")


def engine(stage, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 3, 3))
    config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
              "steps_per_print": 10**9}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    made, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                    optimizer=optimizer, config=config, dist_init_required=False)
    return made


def resume(stage, folder):
    try:
        return _restore(engine(stage, seed=1), None, ray.train.Checkpoint.from_directory(folder))
    except pickle.UnpicklingError:
        return "refused"


found = {}
for stage in (0, 2, 3):
    folder = os.path.join(root, f"zero{stage}")
    trained = engine(stage, seed=0)
    trained.backward(trained(torch.rand(2, 3, 16, 16)).mean())
    trained.step()
    trained.save_checkpoint(folder, tag=DS_TAG, client_state={"step": 7})
    resumed = resume(stage, folder)
    for name in os.listdir(os.path.join(folder, DS_TAG)):
        torch.save({"state_dict": {"weight": Payload()}}, os.path.join(folder, DS_TAG, name))
    found[stage] = [resumed, resume(stage, folder)]
print(json.dumps(found))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_deepspeed_resume_reads_its_files_tensors_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(_free_port()), str(tmp_path), str(marker)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # Each stage resumed at its saved step, then refused its files once they were crafted.
    assert found == {"0": [7, "refused"], "2": [7, "refused"], "3": [7, "refused"]}
    assert not marker.exists()


# The worker's engine for a perceiver whose Stable Diffusion parts come from a saved folder,
# under ZeRO-3, one training step. argv: port, SD folder.
HELD_APART = """
import json, os, sys
import torch, torch.distributed as dist

port, sd = sys.argv[1:]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
from allinone.config import TrainSection
from allinone.models.spec import ModelSpec
from allinone.train.job import StageJob
from allinone.train.loop import _build_ops_as_make_does, _engine, _loss, consolidated_weights

_build_ops_as_make_does()  # the op make built is the one loaded, as in a worker
import deepspeed

dist.init_process_group("gloo")
torch.manual_seed(0)
spec = ModelSpec("perceiver", "tiny", {"pretrained_sd": sd}, ("denoise", "dehaze"))
train = TrainSection(zero_stage=3, lr=1e-2, pixel_loss="l1")
model = spec.build()
frozen = {"vae": model.vae, "unet": model.unet, "text": model.cond_stage_model.model}
before = {name: {k: v.clone() for k, v in part.state_dict().items()}
          for name, part in frozen.items()}
engine = _engine(deepspeed, model, train, StageJob(0, "s", 2, spec, train, 2, 0), world=1)
loss, _ = _loss(engine, torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32),
                torch.tensor([0, 1]), train)
engine.backward(loss)
engine.step()
weights = consolidated_weights(engine, None)
partitioned = lambda part: any(hasattr(p, "ds_id") for p in part.parameters())
print(json.dumps({
    "partitioned": {name: partitioned(part) for name, part in frozen.items()},
    "trainable partitioned": all(hasattr(p, "ds_id") for p in engine.module.parameters()),
    "frozen unchanged": all(
        torch.equal(before[name][k], v) for name, part in frozen.items()
        for k, v in part.state_dict().items()
    ),
    "in the stage weights": sorted({k.split(".")[0] for k in weights}),
}))
"""


def test_frozen_pretrained_parts_stay_out_of_zero3s_partitions(tmp_path: Path) -> None:
    from allinone import models
    from test_models_perceiver import save_sd_folder

    save_sd_folder(models.build("perceiver", "tiny"), tmp_path / "sd")
    done = subprocess.run(
        [sys.executable, "-c", HELD_APART, str(_free_port()), str(tmp_path / "sd")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    # Stable Diffusion's parts are plain tensors the step never touched; what trains is ZeRO's.
    assert found["partitioned"] == {"vae": False, "unet": False, "text": False}
    assert found["trainable partitioned"] is True
    assert found["frozen unchanged"] is True
    assert {"vae", "unet"}.isdisjoint(found["in the stage weights"])
    assert "structcond_stage_model" in found["in the stage weights"]
