"""KL-16 VAE and pixel-patch tokenizers: checkpoint mapping, parity with a PyTorch forward, shapes."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs.harmon import get_config
from unimm.convert.common import CheckpointMismatchError
from unimm.convert.vae_ckpt import vae_from_ckpt, vae_from_torch, vae_to_torch
from unimm.models import layers, vae


def tiny_cfg():
    c = get_config("1.5b").model.vae
    # Two levels (stride 2), channel change 32 -> 64 (nin_shortcut), encoder attention at level 1.
    c.embed_dim, c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions, c.resolution = 4, 32, (1, 2), 2, (8,), 16
    return c


# --- a compact functional PyTorch forward of the reference AutoencoderKL (NCHW) --------------
def _conv(sd, n, x, stride=1, pad=None):
    w = sd[n + ".weight"]
    return F.conv2d(x, w, sd[n + ".bias"], stride=stride, padding=w.shape[-1] // 2 if pad is None else pad)


def _norm(sd, n, x):
    return F.group_norm(x, 32, sd[n + ".weight"], sd[n + ".bias"], eps=1e-6)


def _res(sd, n, x):
    h = _conv(sd, n + ".conv1", F.silu(_norm(sd, n + ".norm1", x)))
    h = _conv(sd, n + ".conv2", F.silu(_norm(sd, n + ".norm2", h)))
    return (_conv(sd, n + ".nin_shortcut", x) if n + ".nin_shortcut.weight" in sd else x) + h


def _attn(sd, n, x):
    b, c, hh, ww = x.shape
    h = _norm(sd, n + ".norm", x)
    q, k, v = (_conv(sd, f"{n}.{m}", h).flatten(2) for m in "qkv")  # [b, c, hw]
    w = torch.softmax(q.transpose(1, 2) @ k * c ** -0.5, dim=-1)  # [b, hw_q, hw_k]
    return x + _conv(sd, n + ".proj_out", (v @ w.transpose(1, 2)).reshape(b, c, hh, ww))


def _mid(sd, n, x):
    return _res(sd, n + ".block_2", _attn(sd, n + ".attn_1", _res(sd, n + ".block_1", x)))


def torch_encode(sd, cfg, x):
    n = len(cfg.ch_mult)
    h = _conv(sd, "encoder.conv_in", x)
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            h = _res(sd, f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = _attn(sd, f"encoder.down.{i}.attn.{j}", h)
        if i < n - 1:
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, pad=0)
    h = _conv(sd, "encoder.conv_out", F.silu(_norm(sd, "encoder.norm_out", _mid(sd, "encoder.mid", h))))
    mean, logvar = _conv(sd, "quant_conv", h).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def torch_decode(sd, cfg, z):
    h = _mid(sd, "decoder.mid", _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z)))
    for i in reversed(range(len(cfg.ch_mult))):
        for j in range(cfg.num_res_blocks + 1):
            h = _res(sd, f"decoder.up.{i}.block.{j}", h)
        if i:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", F.silu(_norm(sd, "decoder.norm_out", h)))


def nchw(x):
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


def nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_cfg()
    params = vae.init(cfg, jax.random.key(0))
    # Perturb every leaf so norm scales/biases and conv biases are not their trivial inits.
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rs.standard_normal(p.shape).astype(np.float32), params)
    sd = vae_to_torch(params, cfg)
    x = np.random.RandomState(1).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)  # non-square
    with torch.no_grad():
        tsd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
        t_mean, t_logvar = torch_encode(tsd, cfg, nchw(x))
        t_dec = torch_decode(tsd, cfg, t_mean)
    return dict(cfg=cfg, params=params, sd=sd, x=x, t_mean=t_mean, t_logvar=t_logvar, t_dec=t_dec)


def test_torch_layout_roundtrip_exact(setup):
    sd, cfg = setup["sd"], setup["cfg"]
    assert "encoder.down.1.attn.1.proj_out.weight" in sd and "encoder.down.0.attn.0.q.weight" not in sd
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)
    assert sd["encoder.down.0.downsample.conv.weight"].shape == (32, 32, 3, 3)
    assert "decoder.up.1.upsample.conv.bias" in sd and "decoder.up.0.upsample.conv.bias" not in sd
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (32, 32, 3, 3)
    back = vae_from_torch(sd, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(setup["params"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, setup["params"])


@pytest.mark.parametrize("edit, name", [
    (lambda sd: sd.update({"encoder.bogus.weight": np.zeros(3)}), "encoder.bogus.weight"),
    (lambda sd: sd.pop("decoder.conv_out.bias"), "decoder.conv_out.bias"),
    (lambda sd: sd.update({"quant_conv.weight": np.zeros((8, 8, 3, 3))}), "quant_conv.weight"),
])
def test_mismatch_is_named(setup, edit, name):
    sd = dict(setup["sd"])
    edit(sd)
    with pytest.raises(CheckpointMismatchError, match=re.escape(name)):
        vae_from_torch(sd, setup["cfg"])


def test_from_ckpt(setup, tmp_path):
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in setup["sd"].items()}
    good = str(tmp_path / "kl16.ckpt")
    # LDM training leaves loss-module weights beside the model: tolerated, nothing else is.
    torch.save({"model": {**tensors, "loss.logvar": torch.zeros(())}}, good)
    back = vae_from_ckpt(good, setup["cfg"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, setup["params"])
    bare = str(tmp_path / "bare.ckpt")
    torch.save(tensors, bare)
    with pytest.raises(CheckpointMismatchError, match="under key 'model'"):
        vae_from_ckpt(bare, setup["cfg"])


def test_parity_with_torch_forward(setup):
    cfg, params, x = setup["cfg"], setup["params"], setup["x"]
    mean, logvar = jax.jit(lambda p, x: vae.encode(p, cfg, x))(params, x)
    assert mean.shape == logvar.shape == (2, 8, 12, 4)
    np.testing.assert_allclose(mean, nhwc(setup["t_mean"]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar, nhwc(setup["t_logvar"]), atol=1e-4, rtol=0)
    dec = jax.jit(lambda p, z: vae.decode(p, cfg, z))(params, nhwc(setup["t_mean"]))
    assert dec.shape == x.shape
    np.testing.assert_allclose(dec, nhwc(setup["t_dec"]), atol=1e-4, rtol=0)


def test_kl16_tokens_match_harmon_layout(setup):
    cfg, params, x = setup["cfg"], setup["params"], setup["x"]
    to_tok = jax.jit(lambda p, x, r=None: vae.images_to_tokens(p, cfg, x, rng=r))
    tokens = to_tok(params, x)
    # Harmon: posterior.mode() * scale, then ``b c h w -> b (h w) c``.
    ref = setup["t_mean"].permute(0, 2, 3, 1).reshape(2, -1, cfg.embed_dim).numpy() * cfg.scale
    assert tokens.shape == (2, 8 * 12, vae.token_dim(cfg)) and vae.grid(cfg, (16, 24)) == (8, 12)
    np.testing.assert_allclose(tokens, ref, atol=1e-4 * cfg.scale, rtol=0)
    sample = to_tok(params, x, jax.random.key(1))
    assert sample.shape == tokens.shape and not np.allclose(sample, tokens)
    images = jax.jit(lambda p, t: vae.tokens_to_images(p, cfg, t, (8, 12)))(params, jnp.asarray(ref))
    np.testing.assert_allclose(images, nhwc(setup["t_dec"]), atol=1e-4, rtol=0)


def test_patch_tokenizer_roundtrip_exact():
    cfg = get_config("tiny").model.vae
    cfg.patch_size, cfg.code_dim = 4, 0
    assert vae.init(cfg, jax.random.key(0)) == {} and vae.token_dim(cfg) == 48
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 16, 8, 3)).astype(np.float32))
    tokens = vae.images_to_tokens({}, cfg, x)
    assert tokens.shape == (2, 4 * 2, 48)
    np.testing.assert_array_equal(tokens[:, 1], x[:, 0:4, 4:8].reshape(2, -1))  # raster order, (p, p, 3)
    np.testing.assert_array_equal(vae.tokens_to_images({}, cfg, tokens, vae.grid(cfg, (16, 8))), x)


def test_patch_code_keeps_the_shapes_worlds_cells_in_24_channels():
    """model.vae.code_dim: the shapes world's 8 px cells are a colour times one of 8 masks on
    black, so 24 principal components rebuild its images exactly; fewer channels lose detail.
    The fit is the same at every start (train, resume, inference) and on any image order."""
    from unimm.data import pipeline
    from unimm.train.state import create_train_state
    from unimm import sharding

    config = get_config("tiny")
    assert config.model.vae.code_dim == config.model.mar.token_dim == 24
    config.data.code_fit_images = 64
    pixels = get_config("tiny,pixel_tokens").model.vae
    cfg = config.model.vae
    images = pipeline.fit_images(config)
    params = vae.fit_patch_code(cfg, images)
    assert vae.token_dim(cfg) == 24 and jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, vae.init(cfg, jax.random.key(0)))
    tokens = vae.images_to_tokens(params, cfg, jnp.asarray(images))
    assert tokens.shape == (64, 9, 24)
    np.testing.assert_allclose(vae.tokens_to_images(params, cfg, tokens, (3, 3)), images, atol=1e-5)
    # A channel varies as a pixel does on average.
    assert abs(float(jnp.mean(jnp.var(tokens.reshape(-1, 24), 0))) / float(np.mean(np.var(
        vae.images_to_tokens({}, pixels, jnp.asarray(images)).reshape(-1, 192), 0))) - 1) < 0.05
    again = vae.fit_patch_code(cfg, images[::-1])
    np.testing.assert_allclose(again["basis"], params["basis"], atol=1e-4)
    state = create_train_state(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]), jax.random.key(1))
    np.testing.assert_array_equal(state.tokenizer_params["basis"], params["basis"])
    cfg.code_dim = 16
    lossy = vae.fit_patch_code(cfg, images)
    rebuilt = vae.tokens_to_images(lossy, cfg, vae.images_to_tokens(lossy, cfg, jnp.asarray(images)), (3, 3))
    assert float(jnp.abs(rebuilt - images).max()) > 0.1


def test_uint8_conversions():
    x = jnp.array([-1.0, 0.0, 1.0, 2.0])
    assert vae.to_uint8(x).tolist() == [0, 128, 255, 255]  # clip(127.5 x + 128) truncated
    np.testing.assert_allclose(vae.from_uint8(jnp.array([0, 255], jnp.uint8)), [-1.0, 1.0])


def test_shape_errors_are_clear():
    cfg = get_config("tiny").model.vae
    cfg.patch_size, cfg.code_dim = 4, 0
    with pytest.raises(ValueError, match=re.escape("expected images [B, H, W, 3], got shape (2, 16, 16)")):
        vae.images_to_tokens({}, cfg, jnp.zeros((2, 16, 16)))
    with pytest.raises(ValueError, match=r"\(2, 18, 16, 3\).*divisible by the tokenizer stride 4"):
        vae.images_to_tokens({}, cfg, jnp.zeros((2, 18, 16, 3)))
    with pytest.raises(ValueError, match="got dtype uint8"):
        vae.images_to_tokens({}, cfg, jnp.zeros((1, 16, 16, 3), jnp.uint8))
    with pytest.raises(ValueError, match=re.escape("expected tokens [B, 16, 48]")):
        vae.tokens_to_images({}, cfg, jnp.zeros((1, 15, 48)), (4, 4))
    with pytest.raises(ValueError, match="not divisible by the tokenizer stride 4"):
        vae.grid(cfg, 30)
    cfg.code_dim = 16              # a patch code with no fitted params: named, with the fix
    for call in (lambda: vae.images_to_tokens({}, cfg, jnp.zeros((1, 16, 16, 3))),
                 lambda: vae.tokens_to_images(None, cfg, jnp.zeros((1, 16, 16)), (4, 4))):
        with pytest.raises(ValueError, match=r"code_dim=16: the tokenizer params must hold the fitted patch "
                           r"code .*initial_tokenizer_params"):
            call()
    cfg.kind = "vq"
    with pytest.raises(ValueError, match="unknown kind 'vq'"):
        vae.token_dim(cfg)


def test_kl16_abstract_shapes_and_count():
    cfg, size = get_config("1.5b").model.vae, get_config("1.5b").model.image_size
    abstract = layers.abstract_params(vae.KLVAE, cfg)
    # Matches the reference AutoencoderKL(16, (1, 1, 2, 2, 4)) parameter count.
    assert layers.param_count(abstract) == 66_456_019
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    tokens = jax.eval_shape(lambda p, x: vae.images_to_tokens(p, cfg, x), abstract, images)
    assert tokens.shape == (2, 256, 16) and vae.grid(cfg, size) == (16, 16)
    out = jax.eval_shape(lambda p, t: vae.tokens_to_images(p, cfg, t, (16, 16)), abstract, tokens)
    assert out.shape == (2, size, size, 3)
