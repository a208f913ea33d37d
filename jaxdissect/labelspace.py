"""The concept vocabulary a dissection scores against: shared by data and engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def check_names(categories: Sequence[str]) -> tuple[str, ...]:
    """`categories` as a tuple; raises ValueError naming `categories=` for a string or a
    repeated name (what needs no dataset to check)."""
    if isinstance(categories, str):
        raise ValueError(f"categories={categories!r}: give a sequence of names, not a string")
    names = tuple(categories)
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ValueError(
            f"categories={','.join(map(str, names))}: {', '.join(repeated)} given more than "
            "once; name each category once"
        )
    return names


@dataclasses.dataclass(frozen=True, eq=False)
class LabelSpace:
    """Labels and categories of a probe set (Broden or another).

    Attributes:
      categories: category names in the order of the dataset's `category.csv`.
      names: label names indexed by label number; `names[0]` is the
        "unlabeled" entry and is never a concept.
      primary: int32 [num_labels], the primary category (index into
        `categories`) of every label; -1 for label 0 and for numbers that no
        category uses.
      image_level: per category, True when its labels are image-level
        (Broden: scene, texture) rather than pixel masks.
    """

    categories: tuple[str, ...]
    names: tuple[str, ...]
    primary: np.ndarray
    image_level: tuple[bool, ...]

    def __post_init__(self):
        primary = np.asarray(self.primary, dtype=np.int32)
        if primary.shape != (len(self.names),):
            raise ValueError(
                f"primary has shape {primary.shape}, expected ({len(self.names)},) "
                "(one entry per label number)"
            )
        if len(self.image_level) != len(self.categories):
            raise ValueError("image_level needs one flag per category")
        if len(primary) and primary[0] != -1:
            raise ValueError("label 0 means 'unlabeled' and must have primary category -1")
        if np.any(primary >= len(self.categories)) or np.any(primary < -1):
            raise ValueError("primary category index out of range")
        object.__setattr__(self, "primary", primary)

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def num_categories(self) -> int:
        return len(self.categories)

    def category_of(self, label: int) -> str | None:
        """Primary category name of `label`, or None for label 0 / unused numbers."""
        c = int(self.primary[label])
        return None if c < 0 else self.categories[c]

    def labels_in(self, category: str) -> np.ndarray:
        """Label numbers whose primary category is `category`."""
        return np.flatnonzero(self.primary == self.categories.index(category))

    def select(self, categories: Sequence[str] | None) -> tuple[str, ...]:
        """The named categories in this label space's order: all for None, else `categories`
        reordered (their order never matters: ties and columns follow the label space).

        Raises ValueError naming `categories=` for a string, a repeated name or a name not
        in the label space.
        """
        if categories is None:
            return self.categories
        names = check_names(categories)
        given = ",".join(map(str, names))
        unknown = [c for c in names if c not in self.categories]
        if unknown:
            raise ValueError(
                f"categories={given}: {', '.join(unknown)} not in the dataset; "
                f"its categories are {', '.join(self.categories)}"
            )
        return tuple(c for c in self.categories if c in names)
