"""The Hugging Face formats the zoo reads and writes, one module each: its config.json fields and
weight names. `common` holds what they share, `rope` the `rope_parameters` mapping, `mha` the GQA
fields and `deepseek_moe` the FFN layout of deepseek_v3 and glm4_moe. A spec is written as the first
format here, in this order, that can express it (zoo.interop.hf_config.hf_config_dict)."""

from zoo.interop.families import deepseek_v3, glm4_moe, mixtral, olmoe, qwen3_moe
from zoo.interop.families.common import Family

FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    deepseek_v3.FAMILY, glm4_moe.FAMILY, qwen3_moe.FAMILY, olmoe.FAMILY, mixtral.FAMILY)}
SUPPORTED = tuple(FAMILIES)

__all__ = ["FAMILIES", "SUPPORTED", "Family"]
