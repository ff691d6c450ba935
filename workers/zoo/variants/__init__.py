"""The zoo family's registry: add a variant by adding its module and one line here."""

from __future__ import annotations

from workers.zoo.variant import ZooVariant
from workers.zoo.variants import distractor, layered, subtract, two_experts

DEFAULT = "two-experts"

VARIANTS: dict[str, ZooVariant] = {
    v.name: v for v in (two_experts.VARIANT, distractor.VARIANT, subtract.VARIANT, layered.VARIANT)
}


def get_variant(name: str = DEFAULT) -> ZooVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown zoo variant {name!r}; the variants are: {', '.join(VARIANTS)}") from None
