"""Self-attention through the TPU splash kernel (``model.llm.attention`` / ``model.mar.attention``
= ``"splash"``), as MaxText does for training and prefill.

The kernel takes a static mask (causal or full) and segment ids instead of a dense mask: a
query attends to keys of its own segment. Valid slots are segment 1 and padding slots 0,
so every valid query sees exactly the valid keys the dense mask allows; a padding query sees
padding keys, and its output (used by nothing) differs from the dense path's. Sequences are
padded to the kernel's 128-wide blocks. Off TPU the kernel runs in Pallas' interpreter, which
is slow: for tests only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 128


@functools.lru_cache(maxsize=32)
def _kernel(seq: int, group: int, causal: bool, interpret: bool):
    """The kernel for one KV head and its ``group`` query heads (MQA form: grouped-query
    attention without copies of K and V)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    one = masks.CausalMask((seq, seq)) if causal else masks.FullMask((seq, seq))
    blocks = kernel.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=BLOCK,
                               block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK, block_kv_dq=BLOCK)
    return kernel.make_splash_mqa(masks.MultiHeadMask([one] * group), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array | None, causal: bool) -> jax.Array:
    """``softmax(q k^T / sqrt(d)) v`` for ``q [B, T, N, D]``, ``k, v [B, T, K, D]`` (``N`` a
    multiple of ``K``: grouped-query heads), ``valid [B, T]`` (None: every slot)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    b, t, n, d = q.shape
    padded = -(-t // BLOCK) * BLOCK
    valid = jnp.ones((b, t), bool) if valid is None else valid
    segments = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, padded - t)))

    kv_heads = k.shape[2]

    def heads_first(x):                                    # [B, T, H, D] -> [B, H, T', D]
        return jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    q = heads_first(q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, kv_heads, n // kv_heads, padded, d)
    fn = _kernel(padded, n // kv_heads, bool(causal), jax.default_backend() != "tpu")
    per_kv_head = jax.vmap(fn, in_axes=(0, 0, 0, None))                 # over the KV heads
    out = jax.vmap(per_kv_head)(q, heads_first(k), heads_first(v), kernel.SegmentIds(q=segments, kv=segments))
    return out.reshape(b, n, padded, d).transpose(0, 2, 1, 3)[:, :t]
