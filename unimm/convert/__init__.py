"""Official PyTorch / safetensors checkpoints <-> unimm params."""
from unimm.convert.common import CheckpointMismatchError  # noqa: F401
from unimm.convert.qwen2_hf import qwen2_from_hf  # noqa: F401
