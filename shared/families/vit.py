"""The Vision Transformer: ViTForImageClassification (family "vit") and ViTModel ("vit_model").

Pre-LN blocks with biases, GELU, no rotary embeddings (so Q and K also get a within-head
permutation), a final LayerNorm; the classifier reads the class token, ViTModel's pooler
(dense + tanh) too.

Who holds what:
- P3 (user) holds the embedding module: the patch embedding (a Conv2d), the class token and
  the position embeddings, under `embeddings.*`, and the image processor's config. It computes
  `x = cat(cls, patches(pixels)) + positions` (B, 1 + N, d) exactly as `ViTEmbeddings` does in
  eval mode and sends `x·π`: the pixels never leave the user.
- P2 (cloud) runs the encoder layers and the final LayerNorm of the stock class on x·π. The
  classifier's head is W_c′ = πᵀ W_c π_c, π_c a permutation of the classes, so P2 returns
  class logits permuted by π_c, as (B, 1, C); the label names (`id2label`) stay with the user
  and P2's config gets generic ones. ViTModel returns the hidden states (B, 1 + N, d) and the
  pooled output (B, d), both permuted by π (π_c = π).

Checkpoint names, as `save_pretrained` writes them, with or without the `vit.` prefix:
`vit.encoder.layer.{i}.attention.attention.query.weight`, ...; θ′ keeps them (so the stock
class's `from_pretrained` loads it) and `module_state` renames them as the installed
transformers does on load (`vit.layers.{i}.attention.q_proj.weight`, ...).
"""

import re
from typing import Any

import torch
import transformers
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from shared.errors import BadTensor, UnsupportedModel
from shared.families.base import (
    CloudOutput,
    Config,
    Embedding,
    Family,
    Piece,
    config_get,
    expect_shape,
    head_weight,
    rows,
    stock_config,
)
from shared.keys import DeveloperKey, ModelDims

CLS = "embeddings.cls_token"
POSITIONS = "embeddings.position_embeddings"
PATCH_W = "embeddings.patch_embeddings.projection.weight"
PATCH_B = "embeddings.patch_embeddings.projection.bias"
EMBEDDING_NAMES = (PATCH_W, PATCH_B, CLS, POSITIONS)
CLASSIFIER_W, CLASSIFIER_B = "classifier.weight", "classifier.bias"

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
# layer tensor names (after `encoder.layer.{i}.`) -> (their role in shared.families.base, the module's name)
LAYER_TENSORS = {
    "attention.attention.query.weight": ("q.weight", "attention.q_proj.weight"),
    "attention.attention.key.weight": ("k.weight", "attention.k_proj.weight"),
    "attention.attention.value.weight": ("v.weight", "attention.v_proj.weight"),
    "attention.attention.query.bias": ("q.bias", "attention.q_proj.bias"),
    "attention.attention.key.bias": ("k.bias", "attention.k_proj.bias"),
    "attention.attention.value.bias": ("v.bias", "attention.v_proj.bias"),
    "attention.output.dense.weight": ("o.weight", "attention.o_proj.weight"),
    "attention.output.dense.bias": ("o.bias", "attention.o_proj.bias"),
    "intermediate.dense.weight": ("ffn_in.weight", "mlp.fc1.weight"),
    "intermediate.dense.bias": ("ffn_in.bias", "mlp.fc1.bias"),
    "output.dense.weight": ("ffn_out.weight", "mlp.fc2.weight"),
    "output.dense.bias": ("ffn_out.bias", "mlp.fc2.bias"),
    "layernorm_before.weight": ("norm", "layernorm_before.weight"),
    "layernorm_before.bias": ("norm", "layernorm_before.bias"),
    "layernorm_after.weight": ("norm", "layernorm_after.weight"),
    "layernorm_after.bias": ("norm", "layernorm_after.bias"),
}
_ROLES = {name: role for name, (role, _) in LAYER_TENSORS.items()}


class _ViTFamily(Family):
    prefix: str  # the encoder's prefix in the stock class ("vit." in the classifier, "" in ViTModel)

    def dims(self, config: Config) -> ModelDims:
        return self.block_dims(config, d_out=self.d_out(config), rope=False)

    def d_out(self, config: Config) -> int:
        return int(config_get(config, "hidden_size"))

    def embedding_names(self, config: Config) -> tuple[str, ...]:
        return EMBEDDING_NAMES

    def transform(self, name: str, tensor: torch.Tensor, key: DeveloperKey, config: Config) -> list[Piece]:
        d = key.dims.d_model
        local = name.removeprefix("vit.")
        embedding_shapes = {
            PATCH_W: (d, int(config_get(config, "num_channels", default=3)), *_pair(config_get(config, "patch_size"))),
            PATCH_B: (d,),
            CLS: (1, 1, d),
            POSITIONS: (1, n_patches(config) + 1, d),
        }
        if local in embedding_shapes:  # the embedding module: user side only, never to P2
            expect_shape(name, tensor, embedding_shapes[local])
            return [Piece("user", local, tensor)]
        if local in ("layernorm.weight", "layernorm.bias"):  # the final norm
            expect_shape(name, tensor, (d,))
            return [Piece("cloud", self.prefix + local, rows(tensor, key.pi))]
        head = self.head_pieces(name, local, tensor, key)
        if head is not None:
            return head
        m = _LAYER.fullmatch(local)
        match = (int(m[1]), m[2]) if m else None
        return self.layer_pieces(name, tensor, key, match, _ROLES, self.prefix + "encoder.layer")

    def head_pieces(self, name: str, local: str, tensor: torch.Tensor, key: DeveloperKey) -> list[Piece] | None:
        """The tensors after the encoder (classifier, pooler), or None: `name` is not one."""
        return None

    def module_state(self, state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in state.items():
            m = re.fullmatch(rf"{re.escape(self.prefix)}encoder\.layer\.(\d+)\.(.+)", name)
            if m and m[2] in LAYER_TENSORS:
                name = f"{self.prefix}layers.{m[1]}.{LAYER_TENSORS[m[2]][1]}"
            out[name] = t
        return out

    def embed_tokens(
        self, embedding: Embedding, config: Config, ids: torch.Tensor, offset: int, types: torch.Tensor | None
    ) -> torch.Tensor:
        raise BadTensor(f"a {self.name} model embeds images, not token ids: use embed_images")

    def embed_images(
        self, embedding: dict[str, torch.Tensor], config: Config, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """User side, exactly `ViTEmbeddings` in eval mode: pixels (B, C, H, W), as the image
        processor returns them -> x (B, 1 + N, d), not yet permuted."""
        size = _pair(config_get(config, "image_size"))
        channels = int(config_get(config, "num_channels", default=3))
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (channels, *size):
            raise BadTensor(
                f"pixel values must be (B, {channels}, {size[0]}, {size[1]}), got {tuple(pixel_values.shape)}"
            )
        w = embedding[PATCH_W]
        pixels = pixel_values.to(w.dtype)
        patches = nn.functional.conv2d(pixels, w, embedding[PATCH_B], stride=tuple(w.shape[2:]))  # (B, d, h, w)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, d)
        cls = embedding[CLS].expand(pixels.shape[0], -1, -1)  # (B, 1, d)
        return torch.cat([cls, patches], dim=1) + embedding[POSITIONS]


class ViTClassifierFamily(_ViTFamily):
    name = "vit"
    architectures = ("ViTForImageClassification",)
    model_types = ()  # a bare model_type "vit" is ViTModel's
    prefix = "vit."

    def d_out(self, config: Config) -> int:
        labels = config.get("id2label") or {}
        n = int(config.get("num_labels") or len(labels))
        if n < 1:
            raise UnsupportedModel("a ViTForImageClassification without classes (num_labels=0) is not supported")
        return n

    def head_pieces(self, name: str, local: str, tensor: torch.Tensor, key: DeveloperKey) -> list[Piece] | None:
        if name == CLASSIFIER_W:  # W_c′ = πᵀ W_c π_c: rows by π_c (classes), columns by π
            return [Piece("cloud", CLASSIFIER_W, head_weight(name, tensor, key))]
        if name == CLASSIFIER_B:
            expect_shape(name, tensor, (key.dims.d_out,))
            return [Piece("cloud", CLASSIFIER_B, rows(tensor, key.pi_c))]
        return None

    def cloud_config(self, config: Config) -> Config:
        """The labels' names stay with the user: P2 knows how many classes there are, not which."""
        n = self.d_out(config)
        out = {k: v for k, v in config.items() if k not in ("id2label", "label2id")}
        return dict(out, num_labels=n)

    def build_cloud_model(self, config: Config) -> nn.Module:
        cfg = stock_config(self.cloud_config(config))
        return transformers.ViTForImageClassification(cfg).eval()

    def stock_forward(
        self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, cache: Any, last_only: bool
    ) -> CloudOutput:
        """x·π (B, 1 + N, d) -> class logits (B, 1, C) permuted by π_c; no KV cache."""
        if not isinstance(model, transformers.ViTForImageClassification):
            raise TypeError(f"expected a ViTForImageClassification, got {type(model).__name__}")
        hidden = encode(model.vit, x, mask)  # (B, S, d) permuted by π
        logits = model.classifier(hidden[:, 0])  # the class token: (B, C) permuted by π_c
        return CloudOutput(output=logits[:, None], cache=None)


class ViTEncoderFamily(_ViTFamily):
    name = "vit_model"
    architectures = ("ViTModel",)
    model_types = ("vit",)
    is_encoder = True
    prefix = ""

    def head_pieces(self, name: str, local: str, tensor: torch.Tensor, key: DeveloperKey) -> list[Piece] | None:
        d, pi = key.dims.d_model, key.pi
        if local == "pooler.dense.weight":  # reads the stream's class token, writes a π-permuted output
            expect_shape(name, tensor, (d, d))
            return [Piece("cloud", local, tensor.index_select(0, pi).index_select(1, pi).contiguous())]
        if local == "pooler.dense.bias":
            expect_shape(name, tensor, (d,))
            return [Piece("cloud", local, rows(tensor, pi))]
        return None

    def dims(self, config: Config) -> ModelDims:
        pooled = config.get("pooler_output_size")
        if self.pooler(config) and pooled not in (None, config.get("hidden_size")):
            raise UnsupportedModel(f"a ViTModel pooler of width {pooled} != hidden_size is not supported")
        return super().dims(config)

    @staticmethod
    def pooler(config: Config) -> bool:
        return bool(config.get("add_pooling_layer", True))

    def build_cloud_model(self, config: Config) -> nn.Module:
        """The stock ViTModel, with a pooler unless the config says `"add_pooling_layer": false`."""
        cfg = stock_config(self.cloud_config(config))
        return transformers.ViTModel(cfg, add_pooling_layer=self.pooler(config)).eval()

    def stock_forward(
        self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, cache: Any, last_only: bool
    ) -> CloudOutput:
        """x·π (B, 1 + N, d) -> hidden states (B, 1 + N, d) and pooled (B, d), both permuted by π."""
        if not isinstance(model, transformers.ViTModel):
            raise TypeError(f"expected a ViTModel, got {type(model).__name__}")
        hidden = encode(model, x, mask)
        pooled = model.pooler(hidden) if model.pooler is not None else None
        return CloudOutput(output=hidden[:, -1:] if last_only else hidden, cache=None, pooled=pooled)


def encode(vit: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The stock ViTModel's layers and final norm on x·π (B, S, d) -> (B, S, d) permuted by π."""
    mask = create_bidirectional_mask(config=vit.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    hidden = inputs_embeds
    for layer in vit.layers:
        hidden = layer(hidden, mask)
    return vit.layernorm(hidden)


def n_patches(config: Config) -> int:
    (h, w), (ph, pw) = _pair(config_get(config, "image_size")), _pair(config_get(config, "patch_size"))
    return (h // ph) * (w // pw)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, list | tuple) else (int(v), int(v))
