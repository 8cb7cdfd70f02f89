"""GPT4RoI: LLaVA-v0 (CLIP → linear projector → LLaMA) plus a region module whose output replaces the
embedding of each `<bbox>` token.

Submodule and parameter names follow the released checkpoint (`spi_module.mlvl_fuse.fuse_convs.3.gn`,
`spi_module.roi_align.flatten_linear`, …) so a converted checkpoint maps key by key:

    official key                      this model
    model.mm_projector.*          →   mm_projector.*
    model.spi_module.*            →   spi_module.*
    model.<llama key>             →   language_model.model.<llama key>
    lm_head.weight                →   language_model.lm_head.weight
    vision_model.* (CLIP)         →   vision_tower.*

Shapes below use the release's numbers: B images, N boxes, C = region_dim (1024), S = pyramid size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align
from transformers import Cache, CLIPVisionModel, DynamicCache, LlamaForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_gpt4roi import GPT4RoIConfig


@dataclass
class ImageFeatures:
    """What the model needs of an image, computed once and shared by every prompt and box on it.

    tokens: `[B, num_image_tokens, text_hidden]` projected patch features for the `<im_patch>` slots.
    pyramid: one fused map per level, `[B, C, S_l, S_l]`, for RoIAlign.
    """

    tokens: torch.Tensor
    pyramid: list[torch.Tensor]
    # Optional keys/values of the shared prompt prefix per LLM layer, `[B, heads, P, head_dim]` each, and the
    # prefix they were computed for (see `GPT4RoIForCausalLM.image_prefix_cache`).
    prefix_ids: tuple[int, ...] | None = None
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def select(self, index: torch.Tensor | Sequence[int]) -> ImageFeatures:
        index = torch.as_tensor(index, device=self.tokens.device, dtype=torch.long)
        kv = None if self.prefix_kv is None else [(k[index], v[index]) for k, v in self.prefix_kv]
        return ImageFeatures(self.tokens[index], [level[index] for level in self.pyramid], self.prefix_ids, kv)

    @staticmethod
    def concat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        """Stack per-image features; prefix keys/values are kept only when every part has the same prefix."""
        prefix_ids = parts[0].prefix_ids
        same_prefix = prefix_ids is not None and all(
            p.prefix_ids == prefix_ids and p.prefix_kv is not None for p in parts
        )
        kv = None
        if same_prefix:
            kv = [
                (torch.cat([p.prefix_kv[i][0] for p in parts]), torch.cat([p.prefix_kv[i][1] for p in parts]))
                for i in range(len(parts[0].prefix_kv))
            ]
        return ImageFeatures(
            tokens=torch.cat([p.tokens for p in parts]),
            pyramid=[torch.cat(levels) for levels in zip(*(p.pyramid for p in parts), strict=True)],
            prefix_ids=prefix_ids if same_prefix else None,
            prefix_kv=kv,
        )


class FuseConv(nn.Module):
    """mmcv `ConvModule(C, C, 3, padding=1, norm_cfg=GN)`: conv (no bias) → GroupNorm → ReLU."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(groups, channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.gn(self.conv(x)))


class MultiLevelFuse(nn.Module):
    """Builds the 4-level pyramid from CLIP layers and mixes neighbouring levels for a few rounds.

    Each round rebuilds every level t from the previous round's maps as
    `cat(level_t[:, :C/2], resize(level_{t+1})[:, 3C/4:], resize(level_{t-1})[:, C/2:3C/4])`
    (the coarser / finer neighbour, clamped at the ends), through one conv shared by all levels.
    """

    def __init__(self, config: GPT4RoIConfig) -> None:
        super().__init__()
        vision_dim, dim = config.vision_config.hidden_size, config.region_dim
        self.sizes = config.pyramid_sizes
        self.input_conv = nn.ModuleList(nn.Conv2d(vision_dim + 2, dim, 1) for _ in self.sizes)
        self.fuse_convs = nn.ModuleList(
            FuseConv(dim, config.fuse_norm_groups) for _ in range(config.num_fuse_rounds)
        )
        self.shuffle = dim // 4
        self.remain = dim - 2 * self.shuffle

    @staticmethod
    def _with_coordinates(x: torch.Tensor) -> torch.Tensor:
        # Channel order [features, x, y], x varying along the width, both in [-1, 1].
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([grid_x, grid_y]).expand(b, 2, h, w)
        return torch.cat([x, coords], dim=1)

    def forward(self, grids: list[torch.Tensor]) -> list[torch.Tensor]:
        """grids: per level `[B, D_vision, g, g]` → per level `[B, C, S_l, S_l]`."""
        levels = []
        for conv, size, grid in zip(self.input_conv, self.sizes, grids, strict=True):
            grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)
            levels.append(conv(self._with_coordinates(grid)))
        last = len(levels) - 1
        lo, hi = self.remain, self.remain + self.shuffle
        for fuse in self.fuse_convs:
            new_levels = []
            for t, level in enumerate(levels):
                size = level.shape[-2:]
                from_top = _resize(levels[min(t + 1, last)][:, hi:], size)
                from_down = _resize(levels[max(t - 1, 0)][:, lo:hi], size)
                new_levels.append(fuse(torch.cat([level[:, :lo], from_top, from_down], dim=1)))
            levels = new_levels
        return levels


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    # The release resizes in fp32 whatever the surrounding dtype.
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=True).to(x.dtype)


class RegionPooler(nn.Module):
    """RoIAlign of every box on every level → per-level conv → sum → ReLU → flatten → linear, plus an
    MLP embedding of the normalized box, lifted to the LLM width."""

    def __init__(self, config: GPT4RoIConfig) -> None:
        super().__init__()
        dim, size = config.region_dim, config.roi_output_size
        self.image_size = config.image_size
        self.output_size = size
        self.sampling_ratio = config.roi_sampling_ratio
        self.pconvs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in config.pyramid_sizes)
        self.pos_embedd = nn.Sequential(
            nn.Linear(4, config.pos_embed_dim),
            nn.ReLU(),
            nn.LayerNorm(config.pos_embed_dim),
            nn.Linear(config.pos_embed_dim, dim),
            nn.ReLU(),
            nn.LayerNorm(dim),
        )
        self.flatten_linear = nn.Linear(dim * size * size, dim)
        self.updims = nn.Linear(dim, config.text_config.hidden_size)

    def forward(self, pyramid: list[torch.Tensor], boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """boxes: `[N, 4]` normalized xyxy; image_index: `[N]` → `[N, text_hidden]`."""
        rois = torch.cat([image_index[:, None].float(), boxes.float() * self.image_size], dim=1)
        pooled = 0
        for pconv, level in zip(self.pconvs, pyramid, strict=True):
            scale = level.shape[-1] / self.image_size
            feats = roi_align(
                level.float(), rois, output_size=self.output_size, spatial_scale=scale,
                sampling_ratio=self.sampling_ratio, aligned=True,
            )  # [N, C, R, R]
            pooled = pooled + pconv(feats.to(pconv.weight.dtype))
        region = self.flatten_linear(F.relu(pooled).flatten(1))  # channel-major, [N, C]
        region = region + self.pos_embedd(boxes.to(region.dtype))
        return self.updims(region)


class RegionEncoder(nn.Module):
    """The released `spi_module` (MLVLROIQueryModule)."""

    def __init__(self, config: GPT4RoIConfig) -> None:
        super().__init__()
        self.grid_size = config.grid_size
        self.mlvl_fuse = MultiLevelFuse(config)
        self.roi_align = RegionPooler(config)

    def fuse(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """levels: per level `[B, g*g, D_vision]` patch tokens (CLS dropped) → fused pyramid."""
        g = self.grid_size
        grids = [x.transpose(1, 2).reshape(x.shape[0], x.shape[2], g, g) for x in levels]
        return self.mlvl_fuse(grids)


class GPT4RoIPreTrainedModel(PreTrainedModel):
    config_class = GPT4RoIConfig
    base_model_prefix = "gpt4roi"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm | nn.GroupNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        else:
            super()._init_weights(module)


class GPT4RoIForCausalLM(GPT4RoIPreTrainedModel):
    """GPT4RoI for region-grounded generation, scoring and training.

    `forward(input_ids, attention_mask, pixel_values, boxes, labels)` is a standard causal-LM forward:
    the `<im_patch>` slots of sample i receive image i's projected features and its k-th `<bbox>`
    token receives the k-th box of `boxes[i]`. Prompts that share images pass `image_index` (sample →
    row of `pixel_values`), or precomputed `image_features` from [`encode_images`].
    """

    def __init__(self, config: GPT4RoIConfig) -> None:
        super().__init__(config)
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.mm_projector = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.spi_module = RegionEncoder(config)
        self.language_model = LlamaForCausalLM(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def encode_images(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """pixel_values `[B, 3, H, W]` (CLIP-normalized, H = W = image_size) → [`ImageFeatures`]."""
        cfg = self.config
        dtype = self.vision_tower.dtype
        hidden = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states
        tokens = self.mm_projector(hidden[cfg.image_feature_layer][:, 1:])
        pyramid = self.spi_module.fuse([hidden[i][:, 1:] for i in cfg.pyramid_feature_layers])
        return ImageFeatures(tokens=tokens, pyramid=pyramid)

    def encode_regions(
        self,
        pixel_values: torch.Tensor | None = None,
        boxes: Sequence[torch.Tensor] = (),
        image_index: Sequence[int] | torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
    ) -> list[torch.Tensor]:
        """Region embeddings, one `[n_i, text_hidden]` tensor per entry of `boxes` (normalized xyxy).

        Entry i is pooled from image `image_index[i]` (default: image i).
        """
        if image_features is None:
            if pixel_values is None:
                raise ValueError("encode_regions needs pixel_values or image_features")
            image_features = self.encode_images(pixel_values)
        device = image_features.tokens.device
        if image_index is None:
            image_index = range(len(boxes))
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            return [image_features.tokens.new_zeros(0, self.config.text_config.hidden_size) for _ in boxes]
        flat = torch.cat([torch.as_tensor(b, dtype=torch.float32, device=device).reshape(-1, 4) for b in boxes])
        owner = torch.repeat_interleave(
            torch.as_tensor(list(image_index), device=device), torch.as_tensor(counts, device=device)
        )
        regions = self.spi_module.roi_align(image_features.pyramid, flat, owner)
        return list(regions.split(counts))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        image_features: ImageFeatures | None,
        boxes: Sequence[torch.Tensor] | None,
        image_index: Sequence[int] | torch.Tensor | None = None,
        regions: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features spliced at `<im_patch>` and regions at `<bbox>` slots.

        The regions are pooled from `image_features` at `boxes`, or given already encoded: `regions[i]`
        `[n_i, text_hidden]` from [`encode_regions`] (training that keeps the vision side frozen computes
        them once).
        """
        cfg = self.config
        embeds = self.get_input_embeddings()(input_ids)  # [B, T, H]
        batch = input_ids.shape[0]
        patch_mask = input_ids == cfg.image_patch_token_id
        bbox_mask = input_ids == cfg.bbox_token_id
        n_patch = patch_mask.sum(1).tolist()
        n_bbox = bbox_mask.sum(1).tolist()
        if boxes is not None and regions is not None:
            raise ValueError("pass boxes or precomputed regions, not both")
        per_sample = boxes if regions is None else regions
        n_boxes = [0] * batch if per_sample is None else [len(b) for b in per_sample]
        if per_sample is not None and len(per_sample) != batch:
            raise ValueError(f"got boxes for {len(per_sample)} samples but {batch} sequences")
        for i in range(batch):
            if n_bbox[i] != n_boxes[i]:
                raise ValueError(
                    f"sample {i} has {n_bbox[i]} <bbox> tokens but {n_boxes[i]} boxes; "
                    "each box needs exactly one <bbox> in the prompt"
                )
            if n_patch[i] not in (0, cfg.num_image_tokens):
                raise ValueError(
                    f"sample {i} has {n_patch[i]} <im_patch> tokens, expected {cfg.num_image_tokens}"
                )
        if image_index is None:
            image_index = list(range(batch))
        image_index = torch.as_tensor(image_index, dtype=torch.long, device=input_ids.device)
        with_image = torch.tensor(n_patch, device=input_ids.device) > 0
        if with_image.any():
            if image_features is None:
                raise ValueError("the prompt has <image> tokens but no pixel_values or image_features")
            tokens = image_features.tokens[image_index[with_image]].to(embeds.dtype)
            embeds = embeds.masked_scatter(patch_mask[..., None], tokens.reshape(-1, tokens.shape[-1]))
        if sum(n_boxes):
            if regions is None:
                if image_features is None:
                    raise ValueError("boxes need an image: pass pixel_values or image_features")
                regions = self.encode_regions(boxes=boxes, image_index=image_index.tolist(),
                                              image_features=image_features)
            regions = torch.cat(list(regions)).to(embeds.dtype)
            # Boolean indexing walks the batch row by row, so the k-th <bbox> of sample i gets box k of i.
            embeds = embeds.masked_scatter(bbox_mask[..., None], regions)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        boxes: Sequence[torch.Tensor] | None = None,
        image_index: Sequence[int] | torch.Tensor | None = None,
        image_features: ImageFeatures | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            if image_features is None and pixel_values is not None:
                image_features = self.encode_images(pixel_values)
            inputs_embeds = self.embed_inputs(input_ids, image_features, boxes, image_index)
        if position_ids is None and attention_mask is not None and cache is None:
            # Left-padded batches: positions count real tokens only.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            labels=labels,
            **kwargs,
        )

    def image_prefix_cache(
        self, prefix_ids: torch.Tensor, image_features: ImageFeatures, image_index: Sequence[int] | torch.Tensor
    ) -> DynamicCache:
        """Run the prompt part shared by every question about an image once per image.

        Every prompt starts with the same tokens up to `<im_end>` (system prompt, `### Human: The`, the image
        block); only the spliced image features differ. `prefix_ids` `[P]` are those tokens; the returned
        cache holds their keys and values per image, repeated for each row of `image_index`, ready for
        [`forward_after_prefix`]. Gradients flow through it, so training uses it too.
        """
        index = torch.as_tensor(image_index, dtype=torch.long, device=prefix_ids.device)
        if image_features.prefix_kv is not None and image_features.prefix_ids == tuple(prefix_ids.tolist()):
            kv = [(k[index], v[index]) for k, v in image_features.prefix_kv]
            return DynamicCache(ddp_cache_data=kv, config=self.config.text_config)
        n_images = image_features.tokens.shape[0]
        ids = prefix_ids.reshape(1, -1).expand(n_images, -1)
        embeds = self.embed_inputs(ids, image_features, None)
        cache = DynamicCache(config=self.config.text_config)
        self.language_model(inputs_embeds=embeds, cache=cache, use_cache=True, logits_to_keep=1)
        cache.reorder_cache(index)
        return cache

    @torch.no_grad()
    def with_prefix_cache(self, prefix_ids: Sequence[int], image_features: ImageFeatures) -> ImageFeatures:
        """`image_features` plus the keys/values of `prefix_ids` on each image, so later prompts on these
        images skip the prefix entirely (an annotator drawing a second box on the same image)."""
        ids = torch.as_tensor(list(prefix_ids), device=image_features.tokens.device)
        n_images = image_features.tokens.shape[0]
        cache = self.image_prefix_cache(ids, image_features, range(n_images))
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return ImageFeatures(image_features.tokens, image_features.pyramid, tuple(ids.tolist()), kv)

    def forward_after_prefix(
        self,
        cache: DynamicCache,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_features: ImageFeatures,
        boxes: Sequence[torch.Tensor],
        image_index: Sequence[int] | torch.Tensor,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutputWithPast:
        """The rest of each prompt (`[B, S]`, padded on either side) after a shared [`image_prefix_cache`]."""
        prefix_len = cache.get_seq_length()
        batch = input_ids.shape[0]
        embeds = self.embed_inputs(input_ids, image_features, boxes, image_index)
        prefix_mask = attention_mask.new_ones(batch, prefix_len)
        full_mask = torch.cat([prefix_mask, attention_mask], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]
        return self.language_model(
            inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions, cache=cache, use_cache=True,
            labels=labels, logits_to_keep=logits_to_keep,
        )
