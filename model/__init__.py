"""Region models as a library: the engine interface (`model.engine`) and one folder per engine.

`from model import …` gives the engine interface and GPT4RoI's classes; names are imported lazily, so
`import model.engine` or `import model.data_format` stays light (no torch) for processes that only need the
registry or the dataset format.

GPT4RoI's modules lived at the top of the package before the engines had folders; their old names
(`model.modeling_gpt4roi`, `python -m model.convert_official`, …) still resolve to `model.gpt4roi.*`.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from model.lazy import lazy_attributes

_EXPORTS = {
    "Engine": "engine",
    "load_engine": "engine",
    "GPT4RoIConfig": "gpt4roi.configuration_gpt4roi",
    "GPT4RoIForCausalLM": "gpt4roi.modeling_gpt4roi",
    "ImageFeatures": "gpt4roi.modeling_gpt4roi",
    "GPT4RoITokenizer": "gpt4roi.tokenization_gpt4roi",
    "GPT4RoIProcessor": "gpt4roi.processing_gpt4roi",
    "GPT4RoIEngine": "gpt4roi.engine",
    "RegionAnnotator": "gpt4roi.inference",
    "RegionQuery": "gpt4roi.inference",
}

_MOVED = ("configuration_gpt4roi", "modeling_gpt4roi", "processing_gpt4roi", "tokenization_gpt4roi", "generation",
          "inference", "training", "prompts", "convert_official")

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_attributes(__name__, _EXPORTS)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `model.<old name>` to the module `model.gpt4roi.<old name>` itself (one module object, so
    classes and isinstance checks are shared), and runs it as `__main__` under `python -m`."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix != __name__ or name not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.gpt4roi.{spec.name.rpartition('.')[2]}")

    def exec_module(self, module):
        pass

    def get_code(self, fullname):
        real = f"{__name__}.gpt4roi.{fullname.rpartition('.')[2]}"
        return importlib.util.find_spec(real).loader.get_code(real)


sys.meta_path.append(_MovedModules())
