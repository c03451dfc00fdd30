from soda.data.augment import ViewAugmentation
from soda.data.datasets import LabelledImages, load_split, load_splits

__all__ = ["LabelledImages", "ViewAugmentation", "load_split", "load_splits"]
