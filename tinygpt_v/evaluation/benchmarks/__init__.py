"""One module per benchmark family; importing this package registers them all in BENCHMARKS."""
from . import custom, gqa, hateful_memes, iconqa, lavis_vqa, refcoco, vizwiz, vqa, vsr  # noqa: F401
