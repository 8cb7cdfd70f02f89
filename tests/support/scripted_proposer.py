"""A tiny random Florence-2 that proposes regions: its answers follow a grammar, the model choosing the rest.

A random model never grounds a phrase of its own accord (it ends at once, or says words only). This engine is
`Florence2Engine` itself, loaded from a tiny checkpoint, whose generation is held to "<word> <six location
tokens>" twice, then the end: the model picks which of `WORDS` and which locations, and everything after the
tokens (the processor's parsing, label matching, scores, the backend's use of them) is the real path. Six
locations make a box for grounding (the first four; the third and fourth are held beyond the first and
second, so the box is not empty) and a triangle for referring-expression segmentation.

Serve it with `PROPOSER=tests.support.scripted_proposer.ScriptedFlorence2` and `PROPOSER_MODEL=<tiny folder>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.florence2.engine import Florence2Engine
from tests.support.florence2_factory import NUM_LOCATIONS

WORDS = ("car", "dog")
REGIONS = 2
LOCATIONS_PER_REGION = 6


class ScriptedFlorence2(Florence2Engine):
    """See the module docstring."""

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str | None = None,
                        options: Mapping[str, str] | None = None) -> ScriptedFlorence2:
        engine = super().from_pretrained(path, device=device, dtype=dtype, options=options)
        tokenizer = engine.tokenizer
        # One token each (the tiny vocabulary has the words after a space).
        words = [tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in WORDS]
        locations = tokenizer.convert_tokens_to_ids([f"<loc_{i}>" for i in range(NUM_LOCATIONS)])
        bins = {token: i for i, token in enumerate(locations)}
        cycle = 1 + LOCATIONS_PER_REGION
        generate = engine.model.generate

        def allowed(_row: int, sofar: Any) -> list[int]:
            said = len(sofar) - 2  # after the decoder start and the forced <s>
            if said < 0:
                return [tokenizer.bos_token_id]
            if said >= REGIONS * cycle:
                return [tokenizer.eos_token_id]
            place = said % cycle
            if place == 0:
                return words
            if place in (3, 4):  # x2 beyond x1, y2 beyond y1
                start = bins[int(sofar[-2])] + 1
                return locations[min(start, NUM_LOCATIONS - 1):]
            return locations

        def scripted(**kwargs: Any) -> Any:
            return generate(**kwargs, prefix_allowed_tokens_fn=allowed)

        engine.model.generate = scripted
        return engine
