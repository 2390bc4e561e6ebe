"""Qwen2 LM: parity with HF transformers (logits, greedy decoding), conversion, sampling."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unimm.convert import CheckpointMismatchError  # noqa: E402
from unimm.convert.qwen2_hf import (config_from_hf, params_from_hf_state,  # noqa: E402
                                    params_to_hf_state, qwen2_from_hf)
from unimm.models import decoding, layers, qwen2  # noqa: E402

VOCAB = 256


def _hf_model(tied: bool, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=1e6, tie_word_embeddings=tied, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    # HF's 0.02 init gives near-zero logits; larger weights, non-unit norms and non-zero
    # biases make the parity checks sensitive to every term.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{tied: (HF model, cfg, params)}; the tied model goes through a sharded folder."""
    out = {}
    for tied in (True, False):
        model = _hf_model(tied, seed=int(tied))
        path = tmp_path_factory.mktemp("qwen2")
        model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "100KB"} if tied else {}))
        assert (path / "model.safetensors.index.json").exists() == tied
        cfg, params = qwen2_from_hf(str(path))
        assert cfg.tie_word_embeddings == tied and ("lm_head" in params) != tied
        out[tied] = model, cfg, params
    return out


both_heads = pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])


def _left_padded(rng, lengths, total):
    tokens = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):
        tokens[i, total - n:] = rng.randint(1, VOCAB, n)
        mask[i, total - n:] = 1
    return tokens, mask


@both_heads
def test_logits_match_hf(converted, tied):
    model, cfg, params = converted[tied]
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    out = np.asarray(qwen2.logits(params, cfg, jnp.asarray(tokens)))
    assert out.dtype == np.float32 and out.shape == (2, 16, VOCAB)
    diff = np.abs(out - ref).max()
    print(f"logits max abs diff {diff:.2e} (|logits| max {np.abs(ref).max():.1f})")
    assert diff <= 1e-4

    tokens, mask = _left_padded(rng, [16, 9], 16)
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos)).logits.numpy()
    out = np.asarray(qwen2.logits(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.isfinite(out).all()  # fully masked padding rows stay finite
    diff = np.abs(out - ref)[mask.astype(bool)].max()
    print(f"left-padded logits max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_greedy_generate_matches_hf(converted):
    model, cfg, params = converted[True]
    tokens, mask = _left_padded(np.random.RandomState(1), [5, 9], 9)

    def hf(eos):
        with torch.no_grad():
            out = model.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=32, eos_token_id=eos, pad_token_id=0).numpy()
        return np.pad(out, ((0, 0), (0, 9 + 32 - out.shape[1])))  # HF stops when all rows end

    ours = np.asarray(qwen2.generate(params, cfg, jnp.asarray(tokens), 32, attention_mask=jnp.asarray(mask),
                                     pad_token_id=0))
    assert ours.dtype == np.int32 and ours.shape == (2, 41)
    np.testing.assert_array_equal(ours, hf(None))
    # An eos that row 0 emits mid-way: afterwards that row emits pad, exactly as in HF.
    eos = int(ours[0, 9 + 4])
    ours = np.asarray(qwen2.generate(params, cfg, jnp.asarray(tokens), 32, attention_mask=jnp.asarray(mask),
                                     eos_token_id=eos, pad_token_id=0))
    np.testing.assert_array_equal(ours, hf(eos))
    assert (ours[0, 9 + 5:] == 0).all()


def test_repetition_penalty_and_eos_ids_match_hf_generate(converted):
    """Greedy decoding with a repetition penalty and two eos ids equals HF's ``generate`` token
    for token: over prompt ids (left padding included), and over the generated ids only when
    the prompt comes as ``inputs_embeds`` (Harmon's captioning)."""
    model, cfg, params = converted[True]
    tokens, mask = _left_padded(np.random.RandomState(4), [4, 7], 7)
    free = np.asarray(qwen2.generate(params, cfg, jnp.asarray(tokens), 24, attention_mask=jnp.asarray(mask)))
    eos = [int(free[0, 7 + 20]), int(free[1, 7 + 22])]   # ids the rows may reach under the penalty too

    def hf(**kw):
        with torch.no_grad():
            out = model.generate(attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=24,
                                 repetition_penalty=1.3, eos_token_id=eos, pad_token_id=0, **kw).numpy()
        return out

    ours = np.asarray(qwen2.generate(params, cfg, jnp.asarray(tokens), 24, attention_mask=jnp.asarray(mask),
                                     repetition_penalty=1.3, eos_token_id=eos, pad_token_id=0))
    ref = hf(input_ids=torch.tensor(tokens))
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == 0).all()
    assert (ours != free).any()   # the penalty changed the continuation

    embeds = np.asarray(params["embed_tokens"]["embedding"])[tokens]
    ours = np.asarray(qwen2.generate(params, cfg, jnp.asarray(tokens), 24, attention_mask=jnp.asarray(mask),
                                     repetition_penalty=1.3, eos_token_id=eos, pad_token_id=0,
                                     inputs_embeds=jnp.asarray(embeds)))[:, 7:]
    ref = hf(inputs_embeds=torch.tensor(embeds))
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == 0).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.8), (1.3, 0, 0.5), (1.0, 5, 1.0)])
def test_sampling_distribution_matches_hf_processors(temperature, top_k, top_p):
    """The distribution sampled from (penalty, temperature, top-k, top-p) equals the one HF's
    logits processors leave on the same logits and ids."""
    from transformers import generation as hf_gen
    rng = np.random.RandomState(5)
    logits = (rng.randn(3, VOCAB) * 3).astype(np.float32)
    ids = rng.randint(0, VOCAB, (3, 12))
    procs = hf_gen.LogitsProcessorList([hf_gen.RepetitionPenaltyLogitsProcessor(1.2)]
                                       + [hf_gen.TemperatureLogitsWarper(temperature)]
                                       + ([hf_gen.TopKLogitsWarper(top_k)] if top_k else [])
                                       + [hf_gen.TopPLogitsWarper(top_p)])
    ref = torch.softmax(procs(torch.tensor(ids), torch.tensor(logits)), -1).numpy()
    seen = decoding.mark_seen(jnp.zeros((3, VOCAB), bool), jnp.asarray(ids))
    ours = decoding.warp(decoding.repetition_penalty(jnp.asarray(logits), seen, 1.2), temperature, top_k,
                         top_p if top_p < 1 else None)
    ours = np.asarray(jax.nn.softmax(ours, -1))
    np.testing.assert_array_equal(ours > 0, ref > 0)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert 1 < (ref[0] > 0).sum() < VOCAB   # the filters kept some and removed some


def test_generation_config_settings(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text('{"do_sample": true, "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, '
                    '"temperature": 0.7, "top_k": 20, "top_p": 0.8, "transformers_version": "4.37.0"}')
    assert decoding.settings_from_generation_config(str(tmp_path)) == {
        "repetition_penalty": 1.1, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
        "eos_token_ids": (151645, 151643)}
    path.write_text('{"top_p": 1.5}')
    with pytest.raises(ValueError, match=r"generation_config.json: top_p=1.5 must be in \(0, 1\]"):
        decoding.settings_from_generation_config(str(path))
    path.write_text('{"eos_token_id": "x"}')
    with pytest.raises(ValueError, match=r"eos_token_id='x' is not a token id"):
        decoding.settings_from_generation_config(str(path))
    with pytest.raises(FileNotFoundError, match="generation config not found"):
        decoding.settings_from_generation_config(str(tmp_path / "nope"))


def test_sampling_reproducible_and_compiled_once(converted):
    _, cfg, params = converted[False]
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, VOCAB, (2, 6)))

    def sample(seed, toks=tokens):
        return np.asarray(qwen2.generate(params, cfg, toks, 12, temperature=0.9, top_p=0.9,
                                         rng=jax.random.key(seed)))

    a = sample(0)
    compiled = qwen2._generate._cache_size()
    np.testing.assert_array_equal(a, sample(0))
    assert (a != sample(1)).any()
    assert (a[:, :6] == np.asarray(tokens)).all() and ((a >= 0) & (a < VOCAB)).all()
    sample(0, tokens[::-1])  # new values, same shapes
    assert qwen2._generate._cache_size() == compiled
    # top_p -> 0 keeps only the best token: sampling collapses to greedy.
    greedy = np.asarray(qwen2.generate(params, cfg, tokens, 12))
    nucleus = np.asarray(qwen2.generate(params, cfg, tokens, 12, temperature=1.0, top_p=1e-6,
                                        rng=jax.random.key(3)))
    np.testing.assert_array_equal(greedy, nucleus)


@both_heads
def test_round_trip_and_mismatch(converted, tied):
    _, cfg, params = converted[tied]
    state = params_to_hf_state(params, cfg)
    back = params_from_hf_state(state, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)

    bad = dict(state)
    bad["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)      # extra
    del bad["model.layers.1.mlp.up_proj.weight"]                                 # missing
    bad["model.norm.weight"] = np.ones(65, np.float32)                           # mis-shaped
    with pytest.raises(CheckpointMismatchError) as err:
        params_from_hf_state(bad, cfg, source="bad.safetensors")
    for key in ("o_proj.bias", "layers.1.mlp.up_proj.weight", "model.norm.weight", "bad.safetensors"):
        assert key in str(err.value)

    if cfg.tie_word_embeddings:  # a saved tied head is accepted only if it is the embedding
        emb = state["model.embed_tokens.weight"]
        params_from_hf_state({**state, "lm_head.weight": emb.copy()}, cfg)
        with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
            params_from_hf_state({**state, "lm_head.weight": emb + 1}, cfg)


def test_config_validation():
    base = dict(model_type="qwen2", hidden_act="silu", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, intermediate_size=16, rope_theta=5.0)
    cfg = config_from_hf(base)
    assert (cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings) == (4, 5.0, False)
    for change, word in [({"model_type": "llama"}, "model_type"), ({"hidden_act": "gelu"}, "hidden_act"),
                         ({"vocab_size": None}, "vocab_size")]:
        with pytest.raises(ValueError, match=word):
            config_from_hf({k: v for k, v in {**base, **change}.items() if v is not None})


def test_cached_forward_matches_full():
    """Chunked prefill through the cache equals one full pass (the path Harmon reuses)."""
    from configs.harmon import get_config
    cfg = get_config("tiny").model.llm
    params = qwen2.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    cfg = layers.freeze(cfg)
    forward = jax.jit(qwen2.forward, static_argnums=1)   # eager, every op would compile on its own
    full, _ = forward(params, cfg, tokens, pos, jnp.ones((2, 10), bool))
    cache = qwen2.init_cache(cfg, 2, 16)
    kv_mask = jnp.arange(16)[None].repeat(2, 0) < 10
    h1, cache = forward(params, cfg, tokens[:, :6], pos[:, :6], kv_mask, cache=cache)
    h2, _ = forward(params, cfg, qwen2.embed(params, cfg, tokens[:, 6:]), pos[:, 6:], kv_mask,
                    cache=cache, cache_offset=jnp.int32(6))
    np.testing.assert_allclose(jnp.concatenate([h1, h2], 1), full, atol=1e-5)


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (True, "dots")])
def test_scan_and_remat_match_unrolled(scan, remat):
    """Layer scanning and rematerialisation change the program, not the function or its gradient."""
    from configs.harmon import get_config
    cfg = get_config("tiny").model.llm
    params = qwen2.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    mask = jnp.ones((2, 10), bool)

    def loss(p, c):
        return jnp.mean(qwen2.forward(p, c, tokens, pos, mask)[0] ** 2)

    other = get_config("tiny").model.llm
    other.scan_layers, other.remat = scan, remat
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_val, ref_grad = value_and_grad(params, layers.freeze(cfg))
    val, grad = value_and_grad(params, layers.freeze(other))
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad, ref_grad)
    with pytest.raises(ValueError, match="model.llm.remat='some'"):
        other.remat = "some"
        qwen2.init(other, jax.random.key(0))


def test_attention_implementation_switch():
    """model.llm.attention / model.mar.attention pick jax.nn.dot_product_attention's
    implementation: "auto" (XLA on CPU) equals the default "xla"; "cudnn" needs a GPU (not
    run here); an unknown name is one error naming the field."""
    from configs.harmon import get_config
    from unimm import resolve
    from unimm.models import harmon, mar
    config = get_config("tiny")
    auto = get_config("tiny")
    auto.model.llm.attention = auto.model.mar.attention = "auto"
    params = harmon.init(layers.freeze(config.model), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, config.model.llm.vocab_size)
    pos, mask = jnp.broadcast_to(jnp.arange(10), (2, 10)), jnp.ones((2, 10), bool)
    seq = config.model.mar.grid ** 2
    image = jax.random.normal(jax.random.key(2), (2, seq, config.model.mar.token_dim))
    idx, valid = mar.gather_visible(jnp.arange(seq)[None, :].repeat(2, 0) % 2 == 0, seq)

    def run(c):
        hidden, _ = qwen2.forward(params["llm"], c.llm, tokens, pos, mask)
        return hidden, mar.encode(params["mar"], c.mar, image, idx, valid)

    bound = {name: (layers.bind(qwen2.Qwen2, c.model.llm, params["llm"]).layers[0].self_attn.implementation,
                    layers.bind(mar.MAR, c.model.mar, params["mar"]).encoder_blocks[0].attn.implementation)
             for name, c in (("xla", config), ("auto", auto))}
    assert bound == {"xla": ("xla", "xla"), "auto": (None, None)}   # what reaches dot_product_attention
    ref = jax.tree.leaves(run(layers.freeze(config.model)))
    for got, want in zip(jax.tree.leaves(run(layers.freeze(auto.model))), ref):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    config.model.mar.attention = "flash"
    with pytest.raises(ValueError, match=r"model.mar.attention='flash': expected one of \('xla', 'cudnn', 'auto', "
                                         r"'splash'\)"):
        resolve.validate(config)


def test_splash_attention_equals_xla_on_valid_slots():
    """"splash" (the TPU kernel; Pallas' interpreter on CPU) gives the LLM's and MAR's outputs
    and the LLM's gradients of the default XLA path on every valid slot (a left-padded row,
    MAR rows past the visible count); cached decoding keeps XLA's path."""
    from configs.harmon import get_config
    from unimm.models import harmon, mar
    config, splash = get_config("tiny"), get_config("tiny")
    splash.model.llm.attention = splash.model.mar.attention = "splash"
    params = harmon.init(layers.freeze(config.model), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, config.model.llm.vocab_size)
    mask = jnp.ones((2, 10), bool).at[1, :3].set(False)
    seq = config.model.mar.grid ** 2
    image = jax.random.normal(jax.random.key(2), (2, seq, config.model.mar.token_dim))
    idx, valid = mar.gather_visible(jnp.arange(seq)[None, :].repeat(2, 0) % 2 == 0, seq)

    def llm_loss(p, c):
        hidden, _ = qwen2.forward(p, c.llm, tokens, qwen2.positions_from_mask(mask), mask)
        return jnp.sum(jnp.where(mask[..., None], jnp.sin(hidden), 0.0)), hidden

    def run(c):
        c = layers.freeze(c.model)
        (_, hidden), grads = jax.value_and_grad(llm_loss, has_aux=True)(params["llm"], c)
        enc = mar.encode(params["mar"], c.mar, image, idx, valid)
        return hidden, grads, enc, mar.decode(params["mar"], c.mar, enc, idx, valid)

    (h, g, e, d), (hs, gs, es, ds) = run(config), run(splash)
    np.testing.assert_allclose(np.asarray(hs)[np.asarray(mask)], np.asarray(h)[np.asarray(mask)], atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), gs, g)
    rows = np.concatenate([np.ones((2, config.model.mar.buffer_size), bool), np.asarray(valid)], 1)
    np.testing.assert_allclose(np.asarray(es)[rows], np.asarray(e)[rows], atol=2e-5)
    np.testing.assert_allclose(np.asarray(ds), np.asarray(d), atol=2e-5)
    greedy = [qwen2.generate(params["llm"], layers.freeze(c.model.llm), tokens, 3, attention_mask=mask)
              for c in (config, splash)]
    np.testing.assert_array_equal(np.asarray(greedy[1]), np.asarray(greedy[0]))
