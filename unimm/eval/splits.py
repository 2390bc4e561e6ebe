"""The shapes benchmark's splits: held-out test items, and validation items of their own for
choosing sampling settings (never tuned on the test items)."""
from unimm import config_utils

VAL_OFFSET = 2_000_000_000   # data.val_offset of runs whose config.json predates the field
# split -> (the data field its shapes indices start at, its sampling seed, its files' prefix)
SPLITS = {"test": ("eval_offset", 0, ""), "validation": ("val_offset", 1, "validation_")}
# The image-sampling settings recorded beside the scores.
SAMPLING_FIELDS = ("num_iter", "cfg", "cfg_schedule", "temperature", "num_sampling_steps",
                   "final_sampling_steps", "plan", "plan_temperature")


def select(config, split: str, sets=()) -> tuple[int, str]:
    """Points ``config``'s held-out items (``data.eval_offset``) at ``split`` and applies the
    ``sample.FIELD=VALUE`` settings in ``sets``; returns the split's sampling seed and the
    prefix of its result files."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {tuple(SPLITS)}")
    for item in sets:
        if not item.startswith("sample."):
            raise ValueError(f"--set={item}: only sample.* fields (how images and captions are drawn) "
                             f"can change for an evaluation")
        config_utils.apply_override(config, item)
    offset_field, seed, prefix = SPLITS[split]
    config.data.eval_offset = config.data.get(offset_field, VAL_OFFSET)
    return seed, prefix
