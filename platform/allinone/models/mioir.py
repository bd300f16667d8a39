"""MiOIR's prompted Restormers (Kong, Dong and Zhang, "Towards Effective Multiple-in-One Image
Restoration: A Sequential and Prompt Learning Strategy", 2023) as the official code builds them
(Xiangtaokong/MiOIR, basicsr/archs/restormer_arch.py: Restormer_EP, Restormer_AP;
basicsr/archs/classifier_arch.py: Classifier; basicsr/models/ir_model.py: how they are used).

Both are Restormer with ``x * scale + shift + x`` at six points: the latent, the outputs of decoder
levels 3, 2 and 1, after the refinement and on the output conv (before the global residual). Four
extractors (three stride-2 convs, ReLU, global mean) read a prompt image: the first feeds the
latent, the second decoder level 3, the third decoder levels 2 and 1 and the refinement, the
fourth the output. Attribute names are the official ones, so a released file's keys are ours.

- Explicit prompt (EP): the prompt image is a fixed random 128 x 128 map per task (``type_maps``,
  the rows of the repository's ``data/type7.npy``; a seeded stand-in until a release is imported).
  Given a task, the network reads that task's map; blind, a degradation classifier trained on its
  own picks one (hard argmax), as the official ``Restormer_EP_class`` test that made the paper's
  numbers does. The model owns the classifier, so one checkpoint restores blind, and trains it in
  a stage of its own: ``trains="classifier"`` freezes the restorer and adds the official
  cross-entropy, ``trains="restorer"`` (default) freezes the classifier.
- Adaptive prompt (AP): the prompt image is the degraded input itself; no task, no classifier.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from allinone.models.base import (
    DEFAULT_TASKS,
    OfficialRelease,
    Restoration,
    RestorationModel,
    register_model,
)
from allinone.models.restormer import (
    RESTORMER_PAPER,
    RESTORMER_TINY,
    Downsample,
    OverlapPatchEmbed,
    Upsample,
    transformer_stage,
)

# Rows of data/type7.npy and outputs of the official classifier, in the official order ("bnjrhd"
# then s: blur, noise, jpeg, rain, haze, dark, sr) under our task names.
OFFICIAL_TASKS = ("deblur", "denoise", "jpeg", "derain", "dehaze", "lowlight", "sr")
MAP_SIZE = 128  # the official maps are 128 x 128 and reach the extractors at that size
TYPE_MAPS = "type_maps"  # the buffer an import fills from type7.npy
CLASSIFIER = "classifier."  # prefix of the classifier's parameters (Classifier.pth's keys)
_MAPS_SEED = 0

# Where the six scale/shift pairs act: (official suffix, extractor 1-4, width in units of dim,
# 0 meaning the image's 3 channels).
FILM_POINTS = (("1", 1, 8), ("2", 2, 4), ("3", 3, 2), ("4", 3, 2), ("5", 3, 2), ("out", 4, 0))


class PromptExtractor(nn.Module):
    """The official F_ext: a prompt image to one vector (its ZeroPad2d(1) is our padding=1)."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(width, width, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.relu(conv(x))
        return x.mean(dim=(-2, -1))


class DegradationClassifier(nn.Module):
    """The official Classifier: which degradation an image carries, as logits.

    The official forward ends in a softmax; ours stops at the logits (the same argmax) and the
    softmax moves into :func:`official_cross_entropy`."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.lastOut = nn.Linear(32, classes)
        self.CondNet = nn.Sequential(
            nn.Conv2d(3, 128, 3, stride=3),
            nn.LeakyReLU(0.1),
            nn.Conv2d(128, 128, 3, stride=3),
            nn.LeakyReLU(0.1),
            nn.Conv2d(128, 128, 1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(128, 128, 1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(128, 32, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.lastOut(self.CondNet(x).mean(dim=(-2, -1)))


def official_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The official ClassModel's loss: nn.CrossEntropyLoss on the classifier's softmax output, so
    a second log-softmax is applied; kept, since it trained the released classifier."""
    return F.cross_entropy(logits.float().softmax(dim=-1), labels)


class PromptedRestormer(RestorationModel):
    """Restormer scaled and shifted at six points by four extractors reading a prompt image."""

    # The official test pads (reflect, bottom and right) to a multiple of 64, not the 8 the
    # network needs; Restormer's attention is global, so the padding changes every pixel.
    size_multiple = 64
    prompt_channels = 3

    def __init__(
        self,
        dim: int = 48,
        num_blocks: Sequence[int] = (4, 6, 6, 8),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.66,
        prompt_dim: int = 64,
        bias: bool = False,
        norm_type: str = "WithBias",
        task_names: Sequence[str] = DEFAULT_TASKS,
    ) -> None:
        super().__init__(tuple(task_names))
        for i in range(1, 5):
            setattr(self, f"F_ext_net{i}", PromptExtractor(self.prompt_channels, prompt_dim))
        for kind in ("scale", "shift"):
            for point, _, width in FILM_POINTS:
                channels = width * dim if width else 3
                setattr(self, f"prompt_{kind}{point}", nn.Linear(prompt_dim, channels))

        def stage(level: int, blocks: int, head_level: int | None = None) -> nn.Sequential:
            heads_at = heads[level if head_level is None else head_level]
            return transformer_stage(
                dim * 2**level, heads_at, blocks, ffn_expansion_factor, bias, norm_type
            )

        self.patch_embed = OverlapPatchEmbed(3, dim, bias)
        self.encoder_level1 = stage(0, num_blocks[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = stage(1, num_blocks[1])
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = stage(2, num_blocks[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = stage(3, num_blocks[3])
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = stage(2, num_blocks[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = stage(1, num_blocks[1])
        self.up2_1 = Upsample(dim * 2)  # level 1 keeps 2 x dim channels, as in Restormer
        self.decoder_level1 = stage(1, num_blocks[0], head_level=0)
        self.refinement = stage(1, num_refinement_blocks, head_level=0)
        self.output = nn.Conv2d(dim * 2, 3, 3, padding=1, bias=bias)

    def prompt_parameters(self) -> Iterator[nn.Parameter]:
        return (
            p for name, p in self.named_parameters() if name.startswith(("F_ext_net", "prompt_"))
        )

    def network(self, x: Tensor, prompt_image: Tensor) -> Tensor:
        vectors = {i: getattr(self, f"F_ext_net{i}")(prompt_image) for i in range(1, 5)}
        films = {point: vectors[source] for point, source, _ in FILM_POINTS}

        def film(feature: Tensor, point: str) -> Tensor:
            scale = getattr(self, f"prompt_scale{point}")(films[point])[:, :, None, None]
            shift = getattr(self, f"prompt_shift{point}")(films[point])[:, :, None, None]
            return feature * scale + shift + feature

        enc1 = self.encoder_level1(self.patch_embed(x))
        enc2 = self.encoder_level2(self.down1_2(enc1))
        enc3 = self.encoder_level3(self.down2_3(enc2))
        latent = film(self.latent(self.down3_4(enc3)), "1")
        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1))
        dec3 = film(self.decoder_level3(dec3), "2")
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1))
        dec2 = film(self.decoder_level2(dec2), "3")
        dec1 = film(self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], 1)), "4")
        dec1 = film(self.refinement(dec1), "5")
        return film(self.output(dec1), "out") + x


class MiOIRAdaptive(PromptedRestormer):
    """Restormer_AP: the extractors read the (padded) degraded input itself."""

    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        return Restoration(self.network(x, x))


def prompt_slots(task_names: Sequence[str]) -> tuple[str, ...]:
    """The tasks that own a map and a classifier output: the official seven in their file order,
    then any other task of the model's, so an imported map always serves its own task."""
    return OFFICIAL_TASKS + tuple(t for t in task_names if t not in OFFICIAL_TASKS)


def seeded_type_maps(slots: int) -> Tensor:
    """Fixed random maps, the same on every build (own generator, on the CPU even when the model
    is built on the meta device); an import replaces them with type7.npy's."""
    generator = torch.Generator().manual_seed(_MAPS_SEED)
    return torch.rand(slots, MAP_SIZE, MAP_SIZE, generator=generator, device="cpu")


class MiOIRExplicit(PromptedRestormer):
    """Restormer_EP with its classifier: the task's fixed map, or the classifier's hard choice."""

    prompt_channels = 1
    # The classifier learns from the official cross-entropy ("cross_entropy"), not the trainer's
    # focal loss on the logits.
    default_aux_weights = {"focal": 0.0}

    def __init__(
        self, trains: Literal["restorer", "classifier"] = "restorer", **backbone: Any
    ) -> None:
        if trains not in ("restorer", "classifier"):
            raise ValueError(f"trains must be 'restorer' or 'classifier', not {trains!r}")
        super().__init__(**backbone)
        slots = prompt_slots(self.task_names)
        self.register_buffer(TYPE_MAPS, seeded_type_maps(len(slots)))
        rows = torch.tensor([slots.index(t) for t in self.task_names])
        self.register_buffer("task_rows", rows, persistent=False)
        self.classifier = DegradationClassifier(len(slots))
        self.trains = trains
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith(CLASSIFIER) == (trains == "classifier"))

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        return (p for name, p in self.named_parameters() if name.startswith(CLASSIFIER))

    def restorer_parameters(self) -> Iterator[nn.Parameter]:
        return (p for name, p in self.named_parameters() if not name.startswith(CLASSIFIER))

    def classify(self, x: Tensor) -> Tensor:
        """Logits over the model's tasks, in task-id order."""
        return self.classifier(x)[:, self.task_rows]

    def restore(self, x: Tensor, task_id: Tensor | None) -> Restoration:
        logits = None
        if task_id is None:
            logits = self.classify(x)
            task_id = logits.argmax(dim=-1)
        maps = getattr(self, TYPE_MAPS)[self.task_rows[task_id]]
        return Restoration(self.network(x, maps[:, None].to(x.dtype)), logits)

    def forward(
        self,
        x: Tensor,
        task_id: Tensor | None = None,
        with_aux: bool = False,
        target: Tensor | None = None,
    ) -> Tensor | Restoration:
        # The official test classifies the image as given, before padding it to 64.
        logits = self.classify(x) if task_id is None or self.trains == "classifier" else None
        chosen = logits.argmax(dim=-1) if task_id is None else task_id
        out = super().forward(x, chosen, with_aux=True, target=target)
        out = out._replace(logits=logits)
        if logits is not None and task_id is not None and target is not None:
            out = out._replace(
                aux={**out.aux, "cross_entropy": official_cross_entropy(logits, task_id)}
            )
        return out if with_aux else out.image


_PAPER = {**RESTORMER_PAPER, "prompt_dim": 64}  # the official prompt_nf and F_ext width
_TINY = {**RESTORMER_TINY, "prompt_dim": 16}
PRESETS = {"tiny": _TINY, "paper": _PAPER}

_REPOSITORY = "Xiangtaokong/MiOIR"
_WHERE = "linked from the authors' README (Google / Baidu Drive)"


@register_model(
    "mioir_explicit",
    PRESETS,
    "MiOIR explicit prompts: a fixed map per task, or a separately trained classifier's choice",
    official=OfficialRelease(
        repository=_REPOSITORY,
        # The published EP system (Restormer_EP_class): Restormer_EP 26,547,578 + Classifier
        # 188,551. Built with trains="restorer", the trainable part is Restormer_EP's.
        parameters=26_736_129,
        weights=(
            f"BasicSR files Restormer_M_EP.pth and Classifier.pth ({{'params'}} / "
            f"{{'params_ema'}}), {_WHERE}, with the repository's data/type7.npy"
        ),
        prompts_key=TYPE_MAPS,
        component_prefix=CLASSIFIER,
    ),
)
def mioir_explicit(
    trains: Literal["restorer", "classifier"] = "restorer", **kwargs: Any
) -> MiOIRExplicit:
    return MiOIRExplicit(trains=trains, **kwargs)


@register_model(
    "mioir_adaptive",
    PRESETS,
    "MiOIR adaptive prompts: scale/shift at six points from extractors reading the input",
    official=OfficialRelease(
        repository=_REPOSITORY,
        parameters=26_572_666,
        weights=f"BasicSR file Restormer_M_AP.pth ({{'params'}} / {{'params_ema'}}), {_WHERE}",
    ),
)
def mioir_adaptive(**kwargs: Any) -> MiOIRAdaptive:
    return MiOIRAdaptive(**kwargs)
