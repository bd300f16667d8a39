"""MPerceiver's own modules around the Stable Diffusion parts, as its official code builds them:

- ``DegradationPredictor`` (official ``CLIP_Predictor``): a frozen CLIP image tower and a two-layer
  head over its embedding, trained in a stage of its own and then frozen.
- ``ImagePromptProjector`` (official ``CM_Inv``): the CLIP image embedding turned into one set of
  visual tokens per degradation for the text encoder (the cross-modal adapter's image half).
- ``TextPromptEncoder`` (official ``FrozenOpenCLIPEmbedder``): the frozen OpenCLIP text tower, read
  at its penultimate layer, run on a sentence whose first tokens are replaced by the learned
  textual prompt and the visual tokens of one degradation.
- ``IRAdapter``: the image-restoration adapter, a half UNet over the degraded latent whose
  multi-scale features are mixed with learned visual prompts by the predicted degradation and
  read out at every scale of the UNet.
- ``FuseSftBlockRRDB``: StableSR's encoder-to-decoder fusion, the detail refinement module.
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

from allinone.models.perceiver.ldm import (
    AttentionBlock,
    CrossAttention,
    Downsample,
    EmbedSequential,
    ResBlock,
    timestep_embedding,
)


class DegradationPredictor(nn.Module):
    """[0, 1] images of any size -> (CLIP image embedding, degradation logits)."""

    def __init__(self, clip: nn.Module, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.model = clip.visual
        embed = self.model.output_dim
        self.fc1 = nn.Linear(embed, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)
        config = self.model.preprocess_cfg
        self.image_size = tuple(self.model.image_size)
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1), False)

    @property
    def embed_dim(self) -> int:
        return self.model.output_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # The official classifier reads the whole image squashed to 224 x 224 with PIL's bicubic
        # (which low-passes when it shrinks): bicubic with antialias is its tensor equivalent.
        x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True)
        with torch.no_grad():  # the tower never trains, in any stage
            embedding = self.model((x - self.mean) / self.std)
        return embedding, self.fc2(self.relu(self.fc1(embedding)))


class ImagePromptProjector(nn.Module):
    """Image embedding -> ``num_tokens`` tokens, then one self-attention per degradation class."""

    def __init__(self, embed_dim: int, dim: int, num_tokens: int, num_classes: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(embed_dim, num_tokens * dim)
        self.norm = nn.LayerNorm(dim)
        self.attns = nn.ModuleList(
            CrossAttention(dim, None, heads=8, dim_head=dim // 8) for _ in range(num_classes)
        )

    def forward(self, embedding: Tensor) -> Tensor:
        """(N, embed) -> (N, classes, tokens, dim)."""
        tokens = self.norm(self.proj(embedding).unflatten(-1, (self.num_tokens, -1)))
        return torch.stack([attn(tokens) for attn in self.attns], dim=1)


class TextPromptEncoder(nn.Module):
    """The OpenCLIP text tower on "<sot> X..X *..* <eot>", the X slots replaced by a textual prompt
    and the * slots by visual tokens: per token features of its last layer, i.e. the penultimate
    layer of the full tower (SD 2's ``layer: penultimate``; the last one is never built).

    The sentence is fixed (MPerceiver's caption is empty), so it is tokenised once, here.
    """

    def __init__(
        self,
        text_cfg: open_clip.CLIPTextCfg,
        layers: int,
        tokenizer,
        prompt_tokens: int,
        image_tokens: int,
    ) -> None:
        super().__init__()
        self.model = TextTransformer(
            context_length=text_cfg.context_length,
            vocab_size=text_cfg.vocab_size,
            width=text_cfg.width,
            heads=text_cfg.heads,
            layers=layers,
            mlp_ratio=text_cfg.mlp_ratio,
            output_dim=None,  # the pooled projection is not part of SD's conditioning
        )
        self.prompt_tokens, self.image_tokens = prompt_tokens, image_tokens
        sentence = " ".join(["X"] * prompt_tokens + ["*"] * image_tokens)
        ids = [tokenizer.sot_token_id, *tokenizer.encode(sentence), tokenizer.eot_token_id]
        if len(ids) != prompt_tokens + image_tokens + 2 or len(ids) > text_cfg.context_length:
            raise ValueError(
                f"{prompt_tokens} textual + {image_tokens} visual prompt tokens do not fit the "
                f"text tower's {text_cfg.context_length} positions"
            )
        ids += [0] * (text_cfg.context_length - len(ids))
        self.register_buffer("tokens", torch.tensor(ids)[None], persistent=False)

    @property
    def width(self) -> int:
        return self.model.width

    def train(self, mode: bool = True) -> TextPromptEncoder:
        return super().train(False)  # frozen means frozen, dropout and all

    def forward(self, textual: Tensor, visual: Tensor) -> Tensor:
        """textual (M, P, D) and visual (M, V, D) prompts -> (M, context, D)."""
        words = self.model.token_embedding(self.tokens).expand(len(visual), -1, -1)
        start, end = 1, 1 + self.prompt_tokens + self.image_tokens
        x = torch.cat([words[:, :start], textual, visual, words[:, end:]], dim=1)
        x = self.model.transformer(x + self.model.positional_embedding, self.model.attn_mask)
        return self.model.ln_final(x)


def size_key(feature: Tensor) -> str:
    """A feature map's size as "HxW": the key of the IR adapter's condition for it."""
    return "x".join(str(n) for n in feature.shape[-2:])


class IRAdapter(nn.Module):
    """A half UNet over the degraded latent: the features before every downsampling and after
    the middle block, each mixed with its level's learned visual prompts (cross-attention, weighted
    by the predicted degradation) and mapped by a ResBlock to ``out_channels``: one condition map
    per UNet scale, keyed by its (height, width)."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: tuple[int, ...],
        channel_mult: tuple[int, ...],
        num_heads: int,
        num_classes: int,
        prompt_tokens: int,
        prompt_dim: int,
    ) -> None:
        super().__init__()
        self.model_channels = model_channels
        emb = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb)
        )
        self.input_blocks = nn.ModuleList(
            [EmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        levels, ch, ds = [], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                self.input_blocks.append(EmbedSequential(*layers))
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                levels.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(
            ResBlock(ch, emb), AttentionBlock(ch, num_heads), ResBlock(ch, emb)
        )
        levels.append(ch)
        self.fea_tran = nn.ModuleList(ResBlock(c, emb, out_channels) for c in levels)
        # (level, class, 1, tokens, dim): the official layout, its singleton axis included.
        self.visual_prompt = nn.Parameter(
            0.02 * torch.randn(len(levels), num_classes, 1, prompt_tokens, prompt_dim)
        )
        self.prompt_attns = nn.ModuleList(
            CrossAttention(c, prompt_dim, heads=8, dim_head=64) for c in levels
        )
        self.norm1 = nn.ModuleList(nn.LayerNorm(c) for c in levels)
        self.norm2 = nn.ModuleList(nn.LayerNorm(prompt_dim) for _ in levels)

    @property
    def num_levels(self) -> int:
        return len(self.fea_tran)

    def forward(self, x: Tensor, timesteps: Tensor, logits: Tensor) -> dict[str, Tensor]:
        """Each level's condition, keyed by its size (:func:`size_key`): string keys, as ZeRO-3's
        module hooks read a returned dict's keys as names."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        features = []
        for module in self.input_blocks:
            if isinstance(module[0], Downsample):
                features.append(x)
            x = module(x, emb)
        features.append(self.middle_block(x, emb))
        probs = logits.softmax(dim=1)
        return {
            size_key(f): self.fea_tran[i](self.prompted(i, f, probs), emb)
            for i, f in enumerate(features)
        }

    def prompted(self, level: int, feature: Tensor, probs: Tensor) -> Tensor:
        """feature + sum_j p_j * attention(feature, visual prompts of class j)."""
        b, c, h, w = feature.shape
        tokens = feature.flatten(2).transpose(1, 2)
        query = self.norm1[level](tokens)
        prompts = self.norm2[level](self.visual_prompt[level])  # (classes, 1, tokens, dim)
        out = tokens
        for j, prompt in enumerate(prompts):
            attended = self.prompt_attns[level](query, prompt.expand(b, -1, -1))
            out = out + probs[:, j, None, None] * attended
        return out.transpose(1, 2).reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------
# Detail refinement: StableSR's encoder-to-decoder fusion (its ldm/modules/diffusionmodules)
# ---------------------------------------------------------------------------------------------


def _normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class PlainResBlock(nn.Module):
    """StableSR's untimed ``ResBlock`` (norm, swish, conv, twice; 1x1 ``conv_out`` shortcut)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_out = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (x if self.conv_out is None else self.conv_out(x))


class ResidualDenseBlock(nn.Module):
    """BasicSR's dense block: five convolutions, each reading all before it."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        for i in range(5):
            out = num_feat if i == 4 else num_grow_ch
            conv = nn.Conv2d(num_feat + i * num_grow_ch, out, 3, padding=1)
            # BasicSR's default_init_weights: Kaiming normal scaled by 0.1, zero bias.
            nn.init.kaiming_normal_(conv.weight)
            with torch.no_grad():
                conv.weight.mul_(0.1)
            nn.init.zeros_(conv.bias)
            setattr(self, f"conv{i + 1}", conv)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for i in range(1, 5):
            conv = getattr(self, f"conv{i}")
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class FuseSftBlockRRDB(nn.Module):
    """decoder feature + w * f(encoder feature, decoder feature) (StableSR's CFW)."""

    def __init__(self, channels: int, num_block: int, num_grow_ch: int) -> None:
        super().__init__()
        self.encode_enc_1 = PlainResBlock(2 * channels, channels)
        self.encode_enc_2 = nn.Sequential(*(RRDB(channels, num_grow_ch) for _ in range(num_block)))
        self.encode_enc_3 = PlainResBlock(channels, channels)

    def forward(self, enc_feat: Tensor, dec_feat: Tensor, w: float) -> Tensor:
        fused = self.encode_enc_1(torch.cat([enc_feat, dec_feat], dim=1))
        return dec_feat + w * self.encode_enc_3(self.encode_enc_2(fused))
