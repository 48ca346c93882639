"""The Hugging Face formats the zoo reads and writes, one module each: its config.json fields and
weight names. `common` holds what they share, `rope` the `rope_parameters` mapping."""

from zoo.interop.families import deepseek_v3, glm4_moe
from zoo.interop.families.common import Family

FAMILIES: dict[str, Family] = {family.model_type: family for family in (deepseek_v3.FAMILY, glm4_moe.FAMILY)}
SUPPORTED = tuple(FAMILIES)

__all__ = ["FAMILIES", "SUPPORTED", "Family"]
