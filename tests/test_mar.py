"""MAR encoder/decoder: static-shape masking vs the reference semantics, utilities, torch layout."""
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs.harmon import get_config, sharding_config
from unimm.convert import mar_torch
from unimm.convert.common import CheckpointMismatchError
from unimm.models import layers, mar

CFG = get_config("tiny").model.mar            # 2 + 2 blocks, buffer 4, 4 heads
CFG.grid, CFG.width, CFG.decoder_width = 4, 64, 64   # L = 16: the figures below assume it
L, BUF = CFG.grid ** 2, CFG.buffer_size
ENCODE = jax.jit(lambda p, t, i, v, buffer_embed=None, grid=None:
                 mar.encode(p, CFG, t, i, v, buffer_embed=buffer_embed, grid=grid), static_argnames="grid")
DECODE = jax.jit(lambda p, x, i, v, grid=None: mar.decode(p, CFG, x, i, v, grid=grid), static_argnames="grid")


def _perturbed(params, seed=1, scale=0.05):
    """Random non-trivial params (LN scales/biases and zero biases get noise too)."""
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(x + scale * rs.randn(*x.shape).astype(np.float32)), params)


@pytest.fixture(scope="module")
def fresh():
    return layers.init_params(mar.MAR, CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def params(fresh):
    return _perturbed(fresh)


@pytest.fixture(scope="module")
def torch_sd(params):
    return {k: torch.from_numpy(v.copy()) for k, v in mar_torch.mar_to_torch(params, CFG).items()}


def _mask(counts, seed=0):
    """A random mask per row with the given numbers of masked tokens."""
    rs = np.random.RandomState(seed)
    m = np.zeros((len(counts), L), np.int32)
    for b, n in enumerate(counts):
        m[b, rs.permutation(L)[:n]] = 1
    return m


def test_init_and_logical_axes(fresh):
    assert fresh["encoder_pos_embed_learned"].shape == (1, L + BUF, CFG.width)
    assert fresh["diffusion_pos_embed_learned"].shape == (1, L, CFG.decoder_width)
    assert fresh["mask_token"].shape == (1, 1, CFG.decoder_width) and fresh["fake_latent"].shape == (1, CFG.width)
    assert abs(float(jnp.std(fresh["encoder_pos_embed_learned"])) - 0.02) < 0.003
    assert not np.any(fresh["encoder_blocks"][0]["attn"]["qkv"]["bias"])
    np.testing.assert_array_equal(fresh["z_proj_ln"]["scale"], 1.0)
    rules = {name for name, _ in sharding_config().logical_axis_rules}
    names = {n for spec in jax.tree.leaves(layers.logical_specs(mar.MAR, CFG),
                                           is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
             for n in spec if n is not None}
    assert names <= rules, names - rules


def test_gather_visible_small():
    mask = jnp.array([[0, 1, 0, 1, 1], [1, 1, 1, 0, 0]])
    idx, valid = mar.gather_visible(mask, 3)
    assert idx.dtype == jnp.int32
    np.testing.assert_array_equal(idx[:, :2], [[0, 2], [3, 4]])
    np.testing.assert_array_equal(valid, [[True, True, False], [True, True, False]])
    assert set(np.asarray(idx[0])) <= {0, 1, 2, 3, 4} and len(set(np.asarray(idx[0]))) == 3


@torch.no_grad()
def _t_block(sd, pre, x, heads, eps):
    """timm Block (eval) from a state dict."""
    b, n, c = x.shape
    g = lambda name: sd[pre + name]  # noqa: E731
    h = F.layer_norm(x, (c,), g("norm1.weight"), g("norm1.bias"), eps)
    qkv = F.linear(h, g("attn.qkv.weight"), g("attn.qkv.bias"))
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
    x = x + F.linear(a, g("attn.proj.weight"), g("attn.proj.bias"))
    h = F.layer_norm(x, (c,), g("norm2.weight"), g("norm2.bias"), eps)
    h = F.gelu(F.linear(h, g("mlp.fc1.weight"), g("mlp.fc1.bias")))
    return x + F.linear(h, g("mlp.fc2.weight"), g("mlp.fc2.bias"))


def _t_resize(pe, grid, buffer):
    """Harmon's get_*_pos_embed: F.interpolate (bilinear) of the image part."""
    if tuple(grid) == (CFG.grid, CFG.grid):
        return pe
    img = pe[:, buffer:].reshape(1, CFG.grid, CFG.grid, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=grid, mode="bilinear").permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([pe[:, :buffer], img], 1)


@torch.no_grad()
def _t_mar(sd, tokens, mask, grid=(CFG.grid, CFG.grid)):
    """Harmon's forward_mae_encoder / forward_mae_decoder (fake_latent in the buffer), which
    drops masked tokens with boolean indexing: every row needs the same visible count."""
    eps, heads, c = CFG.layer_norm_eps, CFG.num_heads, CFG.width
    tokens, mask = torch.tensor(np.asarray(tokens)), torch.tensor(np.asarray(mask)).float()
    b, seq = mask.shape
    x = F.linear(tokens, sd["z_proj.weight"], sd["z_proj.bias"])
    x = torch.cat([sd["fake_latent"].expand(b, BUF, c), x], 1) + _t_resize(sd["encoder_pos_embed_learned"], grid, BUF)
    x = F.layer_norm(x, (c,), sd["z_proj_ln.weight"], sd["z_proj_ln.bias"], eps)
    keep = (1 - torch.cat([torch.zeros(b, BUF), mask], 1)).nonzero(as_tuple=True)
    x = x[keep].reshape(b, -1, c)
    for i in range(CFG.encoder_depth):
        x = _t_block(sd, f"encoder_blocks.{i}.", x, heads, eps)
    x_enc = F.layer_norm(x, (c,), sd["encoder_norm.weight"], sd["encoder_norm.bias"], eps)
    x = F.linear(x_enc, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    pad = sd["mask_token"].repeat(b, BUF + seq, 1).clone()
    pad[keep] = x.reshape(-1, x.shape[-1])
    x = pad + _t_resize(sd["decoder_pos_embed_learned"], grid, BUF)
    for i in range(CFG.decoder_depth):
        x = _t_block(sd, f"decoder_blocks.{i}.", x, heads, eps)
    x = F.layer_norm(x, (x.shape[-1],), sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps)
    return x_enc.numpy(), (x[:, BUF:] + _t_resize(sd["diffusion_pos_embed_learned"], grid, 0)).numpy()


def test_encode_decode_match_naive_per_sample(params, torch_sd):
    counts = [12, 15, 11, 16]                 # visible 4, 1, 5, 0 -> padded to K = 6
    mask = _mask(counts)
    k = 6
    tokens = jax.random.normal(jax.random.key(2), (len(counts), L, CFG.token_dim))
    idx, valid = mar.gather_visible(jnp.asarray(mask), k)
    x_enc = ENCODE(params, tokens, idx, valid)
    assert x_enc.shape == (len(counts), BUF + k, CFG.width)
    z = DECODE(params, x_enc, idx, valid)
    assert z.shape == (len(counts), L, CFG.decoder_width)
    for b, n in enumerate(counts):  # the reference, one sample at a time: no padding at all
        ref_enc, ref_z = _t_mar(torch_sd, np.asarray(tokens[b:b + 1]), mask[b:b + 1])
        np.testing.assert_allclose(x_enc[b, :BUF + L - n], ref_enc[0], atol=5e-5, rtol=1e-4)
        np.testing.assert_allclose(z[b], ref_z[0], atol=5e-5, rtol=1e-4)
    # Padded encoder rows are ignored by the decoder; a visible row's value is not.
    junk = x_enc + 100.0 * (~jnp.concatenate([jnp.ones((len(counts), BUF), bool), valid], 1))[..., None]
    np.testing.assert_allclose(DECODE(params, junk, idx, valid), z, atol=1e-5)
    bumped = x_enc.at[0, BUF].add(1.0)
    assert not np.allclose(DECODE(params, bumped, idx, valid)[0], z[0], atol=1e-3)
    # A custom buffer embedding replaces fake_latent.
    x_fake = ENCODE(params, tokens, idx, valid, jnp.broadcast_to(params["fake_latent"], (len(counts), CFG.width)))
    np.testing.assert_allclose(x_fake, x_enc, atol=1e-6)


def test_other_grid_and_from_torch_match_reference(torch_sd):
    p = mar_torch.mar_from_torch({k: v.numpy() for k, v in torch_sd.items()}, CFG)
    h, w = 3, 5                               # resized position embeddings
    mask = np.zeros((2, h * w), np.int32)
    mask[0, [1, 4, 7, 8, 13]] = 1
    mask[1, [0, 2, 3, 6, 14]] = 1
    tokens = np.random.RandomState(5).randn(2, h * w, CFG.token_dim).astype(np.float32)
    ref_enc, ref_z = _t_mar(torch_sd, tokens, mask, grid=(h, w))
    idx, valid = mar.gather_visible(jnp.asarray(mask), h * w - 5)
    x_enc = ENCODE(p, jnp.asarray(tokens), idx, valid, grid=(h, w))
    np.testing.assert_allclose(x_enc, ref_enc, atol=5e-5, rtol=1e-4)
    z = DECODE(p, x_enc, idx, valid, grid=(h, w))
    np.testing.assert_allclose(z, ref_z, atol=5e-5, rtol=1e-4)


def test_no_recompilation_across_mask_ratios(params):
    k = mar.max_visible_for_training(L, CFG.mask_ratio_min)

    @jax.jit
    def step(p, tokens, rng, ratio):
        orders = mar.random_orders(rng, tokens.shape[0], L)
        mask = mar.mask_by_order(mar.num_masked(L, ratio), orders)
        idx, valid = mar.gather_visible(mask, k)
        return mar.decode(p, CFG, mar.encode(p, CFG, tokens, idx, valid), idx, valid), valid.sum(-1)

    tokens = jnp.ones((2, L, CFG.token_dim))
    for ratio, vis in ((0.8, 3), (0.95, 0), (0.7, 4)):
        z, n_vis = step(params, tokens, jax.random.key(3), jnp.float32(ratio))
        assert z.shape == (2, L, CFG.decoder_width)
        np.testing.assert_array_equal(n_vis, vis)
    assert step._cache_size() == 1


@pytest.mark.parametrize("src,dst", [((4, 4), (6, 6)), ((4, 4), (8, 5)), ((8, 8), (5, 5)),
                                     ((6, 6), (3, 2)), ((5, 7), (2, 9)), ((4, 4), (4, 4))])
def test_resize_pos_embed_matches_torch(src, dst):
    pe = np.random.RandomState(0).randn(1, src[0] * src[1], 8).astype(np.float32)
    ours = mar.resize_pos_embed(jnp.asarray(pe), src, dst)
    grid = torch.from_numpy(pe).reshape(1, *src, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=dst, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 8)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


# ------------------------------------------------------------------------- torch layout


def test_torch_round_trip_is_exact(params):
    sd = mar_torch.mar_to_torch(params, CFG)
    assert sd["encoder_blocks.0.attn.qkv.weight"].shape == (3 * CFG.width, CFG.width)
    assert sd["fake_latent"].shape == (1, CFG.width) and sd["mask_token"].shape == (1, 1, CFG.decoder_width)
    assert {"z_proj_ln.weight", "encoder_norm.bias", "decoder_blocks.1.mlp.fc2.weight"} <= set(sd)
    assert not any(k.startswith(("diffloss", "class_emb")) for k in sd)
    # Keys the Harmon converter owns may ride along.
    back = mar_torch.mar_from_torch({**sd, "class_emb.weight": np.zeros((10, CFG.width)),
                           "diffloss.net.input_proj.weight": np.zeros(3)}, CFG)
    assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(np.asarray, params))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("edit,name", [
    (lambda sd: sd.pop("encoder_blocks.1.mlp.fc1.bias"), "encoder_blocks.1.mlp.fc1.bias"),
    (lambda sd: sd.update({"encoder_blocks.9.norm1.weight": np.zeros(64)}), "encoder_blocks.9.norm1.weight"),
    (lambda sd: sd.update({"decoder_embed.weight": np.zeros((64, 32))}), "decoder_embed.weight"),
])
def test_mismatched_state_dict_names_the_key(params, edit, name):
    sd = mar_torch.mar_to_torch(params, CFG)
    edit(sd)
    with pytest.raises(CheckpointMismatchError, match=name.replace(".", r"\.")):
        mar_torch.mar_from_torch(sd, CFG)


# ------------------------------------------------------------------ masking utilities


def test_masking_utilities():
    orders = mar.random_orders(jax.random.key(6), 3, L)
    assert orders.dtype == jnp.int32
    np.testing.assert_array_equal(np.sort(orders, -1), np.tile(np.arange(L), (3, 1)))
    masker = jax.jit(mar.mask_by_order)
    for n in (0, 5, L):
        mask = np.asarray(masker(jnp.int32(n), orders))
        np.testing.assert_array_equal(mask.sum(-1), n)
        for b in range(3):
            assert set(np.nonzero(mask[b])[0]) == set(np.asarray(orders[b, :n]))
    assert masker._cache_size() == 1
    per_row = np.asarray(mar.mask_by_order(jnp.array([1, 2, 3]), orders))
    np.testing.assert_array_equal(per_row.sum(-1), [1, 2, 3])

    assert int(mar.num_masked(16, 0.7)) == 12 and int(mar.num_masked(16, 0.75)) == 12
    assert int(mar.num_masked(256, 1.0)) == 256 and int(mar.num_masked(256, 0.7)) == 180
    assert mar.max_visible_for_training(256, 0.7) == 76 and mar.max_visible_for_training(16, 0.7) == 4
    assert mar.max_visible_for_training(10, 0.7) == 3

    ratios = jax.vmap(lambda k: mar.sample_mask_ratio(k, 0.7))(jax.random.split(jax.random.key(7), 4000))
    assert float(ratios.min()) >= 0.7 - 1e-6 and float(ratios.max()) <= 1.0
    # Mean of normal(1, 0.25) truncated to [0.7, 1]: 1 + 0.25 (phi(a) - phi(0)) / (Phi(0) - Phi(a)).
    a = -1.2
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mean = 1.0 + 0.25 * (phi - 1 / math.sqrt(2 * math.pi)) / (0.5 - 0.5 * (1 + math.erf(a / math.sqrt(2))))
    assert abs(float(ratios.mean()) - mean) < 0.005
    # Every training ratio leaves at most K visible.
    k = mar.max_visible_for_training(L, 0.7)
    assert int((L - jax.vmap(lambda r: mar.num_masked(L, r))(ratios)).max()) <= k
    # A wider scale (tiny: min 0.1, std 0.5) keeps the bounds and moves mass down: the
    # truncated normal's P(ratio <= 2/3) = (Phi(-2/3 / 0.5) - Phi(-1.8)) / (0.5 - Phi(-1.8)).
    wide = jax.vmap(lambda k: mar.sample_mask_ratio(k, 0.1, 0.5))(jax.random.split(jax.random.key(8), 8000))
    assert float(wide.min()) >= 0.1 - 1e-6 and float(wide.max()) <= 1.0
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    expect = (cdf(-1 / 3 / 0.5) - cdf(-1.8)) / (0.5 - cdf(-1.8))
    assert abs(float(jnp.mean(wide <= 2 / 3)) - expect) < 0.015


def test_per_example_cosine_masks_cover_what_sampling_conditions_on():
    """model.mar.mask_ratio_dist="cosine", mask_ratio_per_example=True (tiny): each row's
    masked count follows its own ratio cos(pi/2 u), so one batch holds fully masked rows
    (the prompt alone) and rows with most tokens visible, as the sampler's later iterations
    see them; the visible tokens gather into K = L at min ratio 0."""
    seq, batch = 9, 4096
    mask, idx, valid, ratio = jax.jit(lambda k: mar.training_mask(k, batch, seq, 0.0, per_example=True,
                                                                  dist="cosine"))(jax.random.key(3))
    assert ratio.shape == (batch,) and idx.shape == (batch, seq)
    counts = np.asarray(mask).sum(-1)
    np.testing.assert_array_equal(counts, np.ceil(seq * np.asarray(ratio) - 1e-6).clip(0, seq))
    np.testing.assert_array_equal(np.asarray(valid).sum(-1), seq - counts)
    # P(count = c) = P(ceil(9 cos(pi/2 u)) = c) = (2/pi)(acos((c-1)/9) - acos(c/9)).
    want = [2 / math.pi * (math.acos((c - 1) / seq) - math.acos(c / seq)) for c in range(1, seq + 1)]
    got = [float(np.mean(counts == c)) for c in range(1, seq + 1)]
    np.testing.assert_allclose(got, want, atol=0.025)
    # The sampler at 4 iterations conditions on 0, 1, 3 and 6 drawn tokens: all trained on.
    assert {0, 1, 3, 6} <= set((seq - counts).tolist())
    # min_ratio clips from below; the per-batch default still draws one scalar ratio.
    clipped = mar.sample_mask_ratio(jax.random.key(1), 0.5, shape=(1000,), dist="cosine")
    assert float(clipped.min()) == 0.5 and float(clipped.max()) <= 1.0
    assert mar.training_mask(jax.random.key(0), 2, seq, 0.7)[3].shape == ()


def test_full_mask_probability_masks_that_share_of_rows_entirely():
    """model.mar.mask_full_prob: that share of the rows is masked entirely (the prompt alone
    conditions them); the rest keep the drawn ratio, so their counts follow cos(pi/2 u)."""
    seq, batch, p = 9, 4096, 0.5
    mask, _, _, ratio = jax.jit(lambda k: mar.training_mask(k, batch, seq, 0.0, per_example=True,
                                                            dist="cosine", full_prob=p))(jax.random.key(4))
    counts = np.asarray(mask).sum(-1)
    np.testing.assert_array_equal(counts, np.ceil(seq * np.asarray(ratio) - 1e-6).clip(0, seq))
    # All masked: the forced share plus the cosine draw's own P(ceil(9 cos) = 9) = (2/pi) acos(8/9).
    full = p + (1 - p) * 2 / math.pi * math.acos(8 / seq)
    assert abs(float(np.mean(counts == seq)) - full) < 0.025
    assert abs(float(np.mean(counts == 1)) - (1 - p) * 2 / math.pi * (math.acos(0) - math.acos(1 / seq))) < 0.02
    # Per batch, the coin decides for the whole batch.
    ratios = [float(mar.training_mask(jax.random.key(i), 4, seq, 0.7, full_prob=p)[3]) for i in range(40)]
    assert 5 < sum(r == 1.0 for r in ratios) < 35 and any(r < 1.0 for r in ratios)


def test_uniform_ratios_mask_every_count_equally_often():
    """mask_ratio_dist="uniform": 1 to 9 of 9 tokens masked, each count about 1/9 of the rows."""
    mask = jax.jit(lambda k: mar.training_mask(k, 9000, 9, 0.0, per_example=True, dist="uniform")[0])(
        jax.random.key(3))
    freq = np.bincount(np.asarray(mask).sum(-1), minlength=10) / 9000
    assert freq[0] == 0 and np.abs(freq[1:] - 1 / 9).max() < 0.015


def test_example_loss_weighting_gives_every_image_one_weight():
    """model.mar.loss_weighting: "token" weighs each masked token 1 (MAR's mean over the batch's
    masked tokens); "example" splits one weight over each image's masked tokens."""
    mask = jnp.asarray([[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mar.loss_weights(mask, "token"), mask.astype(np.float32))
    w = np.asarray(mar.loss_weights(mask, "example"))
    np.testing.assert_allclose(w.sum(1), [1.0, 1.0, 0.0])
    np.testing.assert_allclose(w[0], 0.25) and np.testing.assert_allclose(w[1], [0, 0, 0, 1])
    # The one token left to draw of image 1 weighs as much as all four of image 0 together.
    per_token = np.asarray([[1.0, 1, 1, 1], [5, 5, 5, 5], [7, 7, 7, 7]])
    assert abs((w * per_token).sum() / w.sum() - 3.0) < 1e-6      # (1 + 5) / 2


def test_late_loss_adds_the_mean_of_images_with_few_tokens_left():
    """model.mar.late_loss_weight: the batch's token mean stays, and the images with at most
    late_mask_ratio of their tokens masked add their own token mean times the weight."""
    mask = jnp.asarray([[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]], bool)
    per_token = jnp.asarray([[1.0, 1, 1, 1], [5, 5, 5, 5], [3, 3, 3, 3], [7, 7, 7, 7]])
    token = mar.loss_weights(mask, "token")
    w, scale = mar.late_loss_weights(mask, token, 0.25, 0.0)
    assert w is token and scale == 1.0
    w, scale = mar.late_loss_weights(mask, token, 0.5, 2.0)
    weighted_mean = float((w * per_token).sum() / w.sum())
    token_mean = (4 * 1 + 5 + 2 * 3) / 7
    late_mean = (5 + 2 * 3) / 3                      # images 1 and 2: at most half masked
    assert abs(weighted_mean * float(scale) - (token_mean + 2.0 * late_mean)) < 1e-5
    # No image with few tokens left in the batch: the token mean alone.
    w, scale = mar.late_loss_weights(mask[:1], token[:1], 0.25, 2.0)
    assert abs(float((w * per_token[:1]).sum() / w.sum() * scale) - 1.0) < 1e-6


@pytest.mark.parametrize("seq_len,num_iter", [(16, 4), (16, 64), (256, 64), (1024, 10)])
def test_sampling_schedule_matches_reference(seq_len, num_iter):
    remaining, ours_rem = seq_len, jnp.int32(seq_len)
    nxt = jax.jit(mar.next_mask_len, static_argnums=(1, 2))
    for step in range(num_iter):
        ref = np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
        ref = int(max(1, min(remaining - 1, ref)))
        got = nxt(jnp.int32(step), num_iter, seq_len, ours_rem)
        assert int(got) == ref, (step, int(got), ref)
        remaining, ours_rem = ref, got
    assert remaining == 1  # the last step predicts everything left
    assert int(mar.next_mask_len(0, num_iter, seq_len, 3)) == 2        # clamp to remaining - 1


def test_grid_for_and_full_masking():
    cfg = types.SimpleNamespace(grid=4)
    assert mar.grid_for(cfg, 16) is None and mar.grid_for(cfg, 64) == (8, 8)
    with pytest.raises(ValueError, match="square"):
        mar.grid_for(cfg, 12)
    # A ratio that masks every token still gathers into a (fully padded) K of 1.
    assert mar.max_visible_for_training(9, 0.999) == 1
    mask, idx, valid, _ = mar.training_mask(jax.random.key(0), 2, 9, 0.999)
    assert mask.all() and idx.shape == (2, 1) and not valid.any()


def test_dropout_only_in_training_and_explicit_attention_matches(params):
    """model.mar.dropout (Harmon trains MAR with 0.1): no rng = inference, unchanged; with an
    rng the blocks drop; the explicit attention that dropout needs equals
    ``jax.nn.dot_product_attention`` when nothing is dropped."""
    cfg = layers.freeze(type(CFG)(dict(CFG.items(), dropout=0.1)))
    tokens = jax.random.normal(jax.random.key(0), (2, L, CFG.token_dim))
    idx, valid = mar.gather_visible(jnp.zeros((2, L), bool), L)
    run = jax.jit(lambda key: mar.encode(params, cfg, tokens, idx, valid, dropout_rng=key))
    plain = mar.encode(params, cfg, tokens, idx, valid)
    np.testing.assert_allclose(plain, ENCODE(params, tokens, idx, valid), atol=1e-6)
    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    assert not np.allclose(a, plain, atol=1e-3) and not np.allclose(a, b, atol=1e-3)
    np.testing.assert_array_equal(a, run(jax.random.key(1)))
    assert get_config("tiny").model.mar.dropout == 0.0 and get_config("1.5b").model.mar.dropout == 0.1
    block = layers.bind(mar.MAR, CFG, params).encoder_blocks[0]
    x = jax.random.normal(jax.random.key(3), (2, 7, CFG.width))
    key_mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2], bool)
    np.testing.assert_allclose(block.attn(x, key_mask, 1e-12, jax.random.key(4)), block.attn(x, key_mask),
                               atol=1e-5)
    x = jnp.ones((4000,))
    dropped = mar.dropout(x, 0.1, jax.random.key(5))
    assert abs(float((dropped == 0).mean()) - 0.1) < 0.02 and np.allclose(dropped[dropped > 0], 1 / 0.9)
