"""Official PyTorch / safetensors checkpoints <-> unimm params (loading never executes code)."""
from unimm.convert.common import CheckpointMismatchError  # noqa: F401
from unimm.convert.harmon_pth import harmon_from_pth, harmon_from_torch, harmon_to_torch  # noqa: F401
from unimm.convert.qwen2_hf import qwen2_from_hf  # noqa: F401
from unimm.convert.vae_ckpt import vae_from_ckpt, vae_from_torch, vae_to_torch  # noqa: F401
