"""Qwen2 / Qwen2.5 decoder-only language model (HF ``Qwen2ForCausalLM`` semantics).

Structure is an ``nnx`` module whose param tree reads like the HF state dict
(``layers[i].self_attn.q_proj.kernel`` ...); compute is exposed as pure functions of
``(params, cfg, ...)``: :func:`forward` (hidden states, optional KV cache),
:func:`logits` (the public scoring API) and :func:`generate` (greedy or sampled decoding
with ``transformers``' logits processors and a KV cache, compiled once per shape).
"""
from __future__ import annotations

import functools
from typing import Any
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.models import decoding, layers

def _init(cfg):
    """HF's ``initializer_range`` (0.02 in Qwen2.5)."""
    return layers.normal(cfg.initializer_range)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.scale = layers.param(rngs, layers.ones, (dim,), ("norm",))
        self.eps = eps

    def __call__(self, x):
        # float32 statistics as in HF: bf16 mean-of-squares loses too much precision.
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * h.astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotate-half rotary embedding of ``x`` [B, T, N, D] at integer ``positions`` [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq        # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        h, d, dt = cfg.hidden_size, cfg.head_dim, jnp.dtype(cfg.dtype)
        lin = functools.partial(layers.linear, rngs=rngs, kernel_init=_init(cfg), dtype=dt)
        self.q_proj = lin(h, cfg.num_heads * d, ("embed", "heads"))
        self.k_proj = lin(h, cfg.num_kv_heads * d, ("embed", "kv_heads"))
        self.v_proj = lin(h, cfg.num_kv_heads * d, ("embed", "kv_heads"))
        self.o_proj = lin(cfg.num_heads * d, h, ("heads", "embed"), use_bias=False)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.theta = cfg.rope_theta
        self.implementation = layers.attention_impl(cfg.attention, "model.llm.attention")

    def __call__(self, x, positions, mask, cache=None, cache_offset=0, valid=None):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        if cache is not None:
            start = (0, cache_offset, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": k, "v": v}
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        # Fewer KV heads than query heads (GQA) is handled by dot_product_attention itself.
        out = layers.attention(q, k, v, mask[:, None], self.implementation, valid=valid, causal=True)
        return self.o_proj(out.reshape(b, t, -1)), cache


class MLP(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        h, m, dt = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.dtype)
        lin = functools.partial(layers.linear, rngs=rngs, kernel_init=_init(cfg), use_bias=False, dtype=dt)
        self.gate_proj = lin(h, m, ("embed", "mlp"))
        self.up_proj = lin(h, m, ("embed", "mlp"))
        self.down_proj = lin(m, h, ("mlp", "embed"))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, cache=None, cache_offset=0, valid=None):
        x = layers.shard_batch(x)
        h, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache, cache_offset, valid)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


# Rematerialisation (``model.llm.remat``): what the backward pass may keep from the forward.
REMAT_POLICIES = {
    "none": None,                                              # no remat: keep everything
    "full": jax.checkpoint_policies.nothing_saveable,          # recompute each layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,   # keep matmul outputs
}


def check_remat(name: str) -> str:
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.llm.remat={name!r}; expected one of {tuple(REMAT_POLICIES)}")
    return name


class Qwen2(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
            embedding_init=nnx.with_partitioning(_init(cfg), ("vocab", "embed")), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs)
        self.scan_layers = bool(cfg.scan_layers)
        self.remat = check_remat(cfg.remat)
        if not cfg.tie_word_embeddings:
            self.lm_head = layers.linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"),
                                         rngs=rngs, use_bias=False, kernel_init=_init(cfg))

    def __call__(self, x, positions, kv_mask, cache=None, cache_offset=0):
        t, s = x.shape[1], kv_mask.shape[1]
        q_slot = cache_offset + jnp.arange(t)[:, None]
        mask = (jnp.arange(s)[None, :] <= q_slot) & kv_mask[:, None, :]          # [B, T, S]
        # A query with no valid key (a left-padding slot) attends to itself only, so its
        # softmax stays finite on every backend; real queries are unaffected.
        diag = jnp.arange(s)[None, :] == q_slot
        mask = mask | (diag & ~mask.any(-1, keepdims=True))
        if cache is None:   # a layer attends over its own sequence: kv_mask marks its valid slots
            return self.norm(self._layers_without_cache(x, positions, mask, kv_mask)), None
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions, mask, cache[i], cache_offset)
            new_cache.append(c)
        return self.norm(x), new_cache

    def _layers_without_cache(self, x, positions, mask, valid):
        """The layer stack of training and prefill: optionally rematerialised, optionally
        one ``lax.scan`` over the layers (one compiled layer body instead of ``num_layers``).

        Scanning stacks the per-layer params inside the program (they stay per-layer in
        the params tree, so converters and checkpoints are unchanged): a transient copy of
        the LLM's params on each device, 1/FSDP of them when sharded."""
        graphdef, first = nnx.split(self.layers[0])

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, positions, mask, valid=valid)[0]

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        states = [nnx.split(layer)[1] for layer in self.layers]
        if not self.scan_layers:
            for state in states:
                x = body(x, state)
            return x
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        x, _ = jax.lax.scan(lambda h, st: (body(h, st), None), x, stacked)
        return x

    def lm_logits(self, hidden):
        h = hidden.astype(jnp.float32)
        if hasattr(self, "lm_head"):
            return h @ self.lm_head.kernel[...].astype(jnp.float32)
        return h @ self.embed_tokens.embedding[...].astype(jnp.float32).T


# ----------------------------------------------------------------------------- pure API

def init(cfg, rng: jax.Array) -> Any:
    return layers.init_params(Qwen2, cfg, rng)


def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32) -> list[dict[str, jax.Array]]:
    """Per-layer ``{"k", "v"}`` arrays of shape [B, max_len, KV heads, head_dim]."""
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)]


def embed(params, cfg, tokens) -> jax.Array:
    return layers.bind(Qwen2, cfg, params).embed_tokens(tokens)


def forward(params, cfg, inputs, positions, kv_mask, *, cache=None, cache_offset=0):
    """Hidden states after the final norm, and the updated cache (None without one).

    ``inputs``: int tokens [B, T] or embeddings [B, T, H]; ``positions``: RoPE positions
    [B, T]; ``kv_mask``: bool [B, S] valid key slots (S = T, or the cache length). Query t
    sits at slot ``cache_offset + t`` and attends to valid key slots at or before it.
    """
    model = layers.bind(Qwen2, cfg, params)
    x = model.embed_tokens(inputs) if jnp.issubdtype(inputs.dtype, jnp.integer) \
        else inputs.astype(jnp.dtype(cfg.dtype))
    return model(x, positions, kv_mask.astype(bool), cache, cache_offset)


def lm_logits(params, cfg, hidden) -> jax.Array:
    return layers.bind(Qwen2, cfg, params).lm_logits(hidden)


def positions_from_mask(attention_mask) -> jax.Array:
    """HF positions for left padding: cumsum(mask) - 1, padding slots clipped to 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


@functools.partial(jax.jit, static_argnums=1)
def _logits(params, cfg, tokens, attention_mask):
    hidden, _ = forward(params, cfg, tokens, positions_from_mask(attention_mask), attention_mask)
    return lm_logits(params, cfg, hidden)


def logits(params, cfg, tokens, attention_mask=None) -> jax.Array:
    """float32 next-token logits [B, T, vocab]; ``attention_mask`` 1 = token, 0 = left pad."""
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    return _logits(params, layers.freeze(cfg), tokens, attention_mask)


@functools.partial(jax.jit, static_argnums=1, static_argnames=(
    "max_new_tokens", "greedy", "top_k", "use_top_p", "use_penalty", "penalize_prompt"))
def _generate(params, cfg, tokens, embeds, attention_mask, rng, temperature, top_p, penalty, eos, pad, *,
              max_new_tokens: int, greedy: bool, top_k: int, use_top_p: bool, use_penalty: bool,
              penalize_prompt: bool):
    b, t = tokens.shape
    total = t + max_new_tokens
    kv_mask = jnp.concatenate([attention_mask.astype(bool), jnp.ones((b, max_new_tokens), bool)], 1)
    n_real = attention_mask.astype(jnp.int32).sum(-1)
    vocab = cfg.vocab_size
    # Ids the repetition penalty sees (HF: the input ids, left padding included, then each
    # generated token); a [B, 1] dummy when the penalty is off.
    seen = jnp.zeros((b, vocab if use_penalty else 1), bool)
    if use_penalty and penalize_prompt:
        seen = decoding.mark_seen(seen, tokens)

    def pick(hidden, rng, done, seen):
        lg = lm_logits(params, cfg, hidden[:, -1])
        if use_penalty:
            lg = decoding.repetition_penalty(lg, seen, penalty)
        if greedy:
            tok = jnp.argmax(lg, -1)
        else:
            tok = jax.random.categorical(rng, decoding.warp(lg, temperature, top_k, top_p if use_top_p else None))
        tok = jnp.where(done, pad, tok).astype(jnp.int32)
        if use_penalty:
            seen = decoding.mark_seen(seen, tok)
        return tok, done | jnp.isin(tok, eos), seen

    cache = init_cache(cfg, b, total, jnp.dtype(cfg.dtype))
    hidden, cache = forward(params, cfg, tokens if embeds is None else embeds,
                            positions_from_mask(attention_mask), kv_mask, cache=cache)
    rng, sub = jax.random.split(rng)
    tok, done, seen = pick(hidden, sub, jnp.zeros((b,), bool), seen)
    out = jnp.concatenate([tokens.astype(jnp.int32), jnp.full((b, max_new_tokens), pad, jnp.int32)], 1)
    out = out.at[:, t].set(tok)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~done.all()

    def body(carry):
        i, tok, cache, out, done, rng, seen = carry
        # Feed token i-1 (slot t+i-1) and pick token i.
        hidden, cache = forward(params, cfg, tok[:, None], (n_real + i - 1)[:, None], kv_mask,
                                cache=cache, cache_offset=t + i - 1)
        rng, sub = jax.random.split(rng)
        tok, done, seen = pick(hidden, sub, done, seen)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, t + i))
        return i + 1, tok, cache, out, done, rng, seen

    carry = (jnp.int32(1), tok, cache, out, done, rng, seen)
    return jax.lax.while_loop(cond, body, carry)[3]


def generate(params, cfg, tokens, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             rng: jax.Array | None = None, attention_mask=None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             inputs_embeds: jax.Array | None = None) -> jax.Array:
    """Prompt + ``max_new_tokens`` continuation, int32 [B, T + max_new_tokens], as HF's
    ``generate``: greedy when ``temperature == 0`` (``do_sample=False``), else sampling with
    ``rng`` after temperature, ``top_k`` (0 = off) and ``top_p``; ``repetition_penalty``
    (1 = off) applies to both (:mod:`unimm.models.decoding`).

    Prompts are left-padded (``attention_mask`` 0 = pad). After any of the ``eos_token_id``
    ids a row emits ``pad_token_id`` (default: the first eos); decoding stops once every
    row is done. ``inputs_embeds [B, T, H]`` replaces the prompt's embeddings in the prefill
    (image placeholders filled by the caller); ``tokens`` still fills the output's prompt
    part. As in HF, the penalty counts the prompt's ids only when no ``inputs_embeds`` are
    given (HF's ``generate(inputs_embeds=...)`` has no prompt ids).
    """
    greedy = temperature == 0.0
    if not greedy and rng is None:
        raise ValueError("generate: sampling (temperature > 0) needs an rng")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    decoding.check_settings(repetition_penalty, 1.0 if greedy else temperature, top_k, top_p, "generate")
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    eos = jnp.asarray(eos or [-1], jnp.int32)  # -1 never matches a token
    rng = jax.random.key(0) if rng is None else rng
    return _generate(params, layers.freeze(cfg), jnp.asarray(tokens), inputs_embeds, jnp.asarray(attention_mask),
                     rng, jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                     jnp.float32(repetition_penalty), eos, jnp.int32(pad), max_new_tokens=max_new_tokens,
                     greedy=greedy, top_k=0 if greedy else int(top_k), use_top_p=not greedy and top_p < 1.0,
                     use_penalty=repetition_penalty != 1.0, penalize_prompt=inputs_embeds is None)
