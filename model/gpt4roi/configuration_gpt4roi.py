"""GPT4RoI configuration: a CLIP vision config, a LLaMA text config and the region-module settings.

The released checkpoint hard-codes 224 px, a 16×16 patch grid, 1024 region channels and a 4096-wide LLM;
here every such number is derived from the config, so the same code serves the 7B model and the small
CPU presets.
"""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedConfig

# Added tokens, in the id order of the release (right after the SentencePiece vocabulary).
ADDED_TOKENS = ("[PAD]", "<im_patch>", "<bbox>", "<point>", "<im_start>", "<im_end>")


class GPT4RoIConfig(PreTrainedConfig):
    """Configuration of [`GPT4RoIForCausalLM`].

    Args:
        vision_config: CLIP vision tower (`CLIPVisionConfig` or its dict).
        text_config: LLaMA language model (`LlamaConfig` or its dict). Its `vocab_size` includes the six
            added tokens, which occupy the last six ids unless given explicitly below.
        image_feature_layer: index into the vision tower's `hidden_states` for the image tokens
            (-2: the second-to-last layer, CLS dropped, no post-LayerNorm).
        pyramid_feature_layers: `hidden_states` indices feeding pyramid levels 0..3 (shallow → deep).
        pyramid_scales: each level's size as a multiple of the patch grid (the release: 8, 4, 2, 1 on a
            16×16 grid → 128, 64, 32, 16).
        region_dim: channels of the fuse module and of the pooled region features (1024 in the release).
        num_fuse_rounds: rounds of cross-level fusion (5); each round shares one conv + GroupNorm.
        fuse_norm_groups: GroupNorm groups of the fuse convs (64).
        roi_output_size: RoIAlign output size (14) and `roi_sampling_ratio` its sampling ratio (2).
        pos_embed_dim: hidden width of the box position MLP (256).
        *_token_id: ids of the added tokens; `None` places them at the end of the vocabulary.
    """

    model_type = "gpt4roi"
    sub_configs = {"vision_config": CLIPVisionConfig, "text_config": LlamaConfig}

    def __init__(
        self,
        vision_config: CLIPVisionConfig | dict[str, Any] | None = None,
        text_config: LlamaConfig | dict[str, Any] | None = None,
        image_feature_layer: int = -2,
        pyramid_feature_layers: tuple[int, ...] | list[int] = (14, 17, 20, 23),
        pyramid_scales: tuple[int, ...] | list[int] = (8, 4, 2, 1),
        region_dim: int = 1024,
        num_fuse_rounds: int = 5,
        fuse_norm_groups: int = 64,
        roi_output_size: int = 14,
        roi_sampling_ratio: int = 2,
        pos_embed_dim: int = 256,
        pad_token_id: int | None = None,
        image_patch_token_id: int | None = None,
        bbox_token_id: int | None = None,
        point_token_id: int | None = None,
        im_start_token_id: int | None = None,
        im_end_token_id: int | None = None,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        if isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**vision_config)
        if isinstance(text_config, dict):
            text_config = LlamaConfig(**text_config)
        self.vision_config = vision_config if vision_config is not None else CLIPVisionConfig()
        self.text_config = text_config if text_config is not None else LlamaConfig()
        self.image_feature_layer = image_feature_layer
        self.pyramid_feature_layers = list(pyramid_feature_layers)
        self.pyramid_scales = list(pyramid_scales)
        self.region_dim = region_dim
        self.num_fuse_rounds = num_fuse_rounds
        self.fuse_norm_groups = fuse_norm_groups
        self.roi_output_size = roi_output_size
        self.roi_sampling_ratio = roi_sampling_ratio
        self.pos_embed_dim = pos_embed_dim
        self.initializer_range = initializer_range

        first_added = self.text_config.vocab_size - len(ADDED_TOKENS)
        defaults = {name: first_added + i for i, name in enumerate(ADDED_TOKENS)}
        self.image_patch_token_id = _or(image_patch_token_id, defaults["<im_patch>"])
        self.bbox_token_id = _or(bbox_token_id, defaults["<bbox>"])
        self.point_token_id = _or(point_token_id, defaults["<point>"])
        self.im_start_token_id = _or(im_start_token_id, defaults["<im_start>"])
        self.im_end_token_id = _or(im_end_token_id, defaults["<im_end>"])
        kwargs.setdefault("bos_token_id", self.text_config.bos_token_id)
        kwargs.setdefault("eos_token_id", self.text_config.eos_token_id)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(pad_token_id=_or(pad_token_id, self.text_config.pad_token_id), **kwargs)
        self._check()

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def grid_size(self) -> int:
        """Patches per side (16 for CLIP ViT-L/14 at 224 px)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    @property
    def pyramid_sizes(self) -> list[int]:
        return [self.grid_size * scale for scale in self.pyramid_scales]

    def _check(self) -> None:
        n_states = self.vision_config.num_hidden_layers + 1
        for layer in [*self.pyramid_feature_layers, self.image_feature_layer]:
            if not -n_states <= layer < n_states:
                raise ValueError(f"vision layer {layer} out of range for a {n_states - 1}-layer vision tower")
        if len(self.pyramid_feature_layers) != len(self.pyramid_scales):
            raise ValueError("pyramid_feature_layers and pyramid_scales must have the same length")
        if self.region_dim % 4 or self.region_dim % self.fuse_norm_groups:
            raise ValueError("region_dim must be divisible by 4 and by fuse_norm_groups")
        if self.vision_config.image_size % self.vision_config.patch_size:
            raise ValueError("vision image_size must be a multiple of patch_size")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT4RoIConfig:
        """A named configuration: `gpt4roi-7b` (the release), `tiny` (unit tests), `demo` (CPU demo).

        `overrides` replace top-level fields; `vocab_size=` sets the text vocabulary (added tokens
        included), which the small presets take from their tokenizer.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        preset = {key: dict(value) if isinstance(value, dict) else value for key, value in PRESETS[name].items()}
        vocab_size = overrides.pop("vocab_size", None)
        if vocab_size is not None:
            preset["text_config"]["vocab_size"] = vocab_size
        preset.update(overrides)
        return cls(**preset)


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


_LLAMA_SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}

PRESETS: dict[str, dict[str, Any]] = {
    # The released GPT4RoI-7B: CLIP ViT-L/14 @ 224 + LLaMA-1 7B (Vicuna v0), vocabulary 32000 + 6.
    "gpt4roi-7b": {
        "vision_config": {
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 768,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "vocab_size": 32006, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", **_LLAMA_SPECIAL,
        },
        "pad_token_id": 0,
    },
    # Smallest shape that exercises every code path; random weights, for unit tests.
    "tiny": {
        "vision_config": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 5, "num_attention_heads": 4,
            "image_size": 64, "patch_size": 16, "hidden_act": "quick_gelu",
        },
        "text_config": {
            "vocab_size": 262, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6, **_LLAMA_SPECIAL,
        },
        "pyramid_feature_layers": [1, 2, 3, 4],
        "region_dim": 32, "num_fuse_rounds": 2, "fuse_norm_groups": 8, "roi_output_size": 7,
        "pos_embed_dim": 16,
    },
    # The CPU demo model trained by `python -m model.demo` on synthetic shapes. A 16 x 16 patch grid, as the
    # 7B's: with 8 x 8 patches of 12 px a small object covers about one patch, and even a vision tower
    # taught every shape could not tell a small cross from a blob.
    "demo": {
        "vision_config": {
            "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4,
            "image_size": 96, "patch_size": 6, "hidden_act": "quick_gelu",
        },
        "text_config": {
            "vocab_size": 518, "hidden_size": 192, "intermediate_size": 384, "num_hidden_layers": 3,
            "num_attention_heads": 6, "num_key_value_heads": 6, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6, **_LLAMA_SPECIAL,
        },
        "pyramid_feature_layers": [1, 2, 3, 4],
        "pyramid_scales": [4, 2, 1, 1],
        "region_dim": 64, "num_fuse_rounds": 2, "fuse_norm_groups": 8, "roi_output_size": 7,
        "pos_embed_dim": 32,
    },
}
