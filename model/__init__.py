"""GPT4RoI as a library: configuration, model, processor, generation and scoring, training, conversion.

Names are imported lazily, so `import model.prompts` or `import model.data_format` stays light (no torch)
for processes that only need the templates or the dataset format.
"""

from model.lazy import lazy_attributes

_EXPORTS = {
    "GPT4RoIConfig": "configuration_gpt4roi",
    "GPT4RoIForCausalLM": "modeling_gpt4roi",
    "ImageFeatures": "modeling_gpt4roi",
    "GPT4RoITokenizer": "tokenization_gpt4roi",
    "GPT4RoIProcessor": "processing_gpt4roi",
    "RegionAnnotator": "inference",
    "RegionQuery": "inference",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_attributes(__name__, _EXPORTS)
