"""Configs: the official sizes' parameter counts, recipes as tables, one resolved config, old config.json files."""
import jax
import ml_collections
import pytest

from unimm import config_utils
from unimm.models import harmon, layers, vae


def qwen2_count(v, h, n_layers, heads, kv, hd, inter, tied):
    attn = h * heads * hd + heads * hd + 2 * (h * kv * hd + kv * hd) + heads * hd * h
    layer = attn + 3 * h * inter + 2 * h
    return v * h + n_layers * layer + h + (0 if tied else v * h)


def block_count(c, ratio=4):
    return 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (c * ratio * c + ratio * c) + (ratio * c * c + c)


def mar_count(d, c, depth_e, depth_d, seq, buf):
    enc = c + (d * c + c) + 2 * c + (seq + buf) * c + depth_e * block_count(c) + 2 * c
    dec = (c * c + c) + c + (seq + buf) * c + depth_d * block_count(c) + 2 * c + seq * c
    return enc + dec


def head_count(d, w, depth, cond):
    time = 256 * w + w + w * w + w
    blocks = depth * (2 * w + 2 * (w * w + w) + (w * 3 * w + 3 * w))
    final = (w * 2 * w + 2 * w) + (w * 2 * d + 2 * d)
    return (d * w + w) + time + (cond * w + w) + blocks + final


def proj_count(c, h):
    return (c * h + h + h * h + h) + (h * h + h + h * c + c)


# (variant, qwen2 dims, MAR width/depth, head depth x width) — the official architectures.
OFFICIAL = {
    "0.5b": dict(llm=(151936, 896, 24, 14, 2, 64, 4864), mar=(768, 12, 12), head=(6, 1024), llm_total=494_032_768),
    "1.5b": dict(llm=(151936, 1536, 28, 12, 2, 128, 8960), mar=(1280, 20, 20), head=(12, 1536),
                 llm_total=1_543_714_304),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(OFFICIAL))
def test_official_parameter_counts(variant):
    cfg = config_utils.load_config(f"configs/harmon.py:{variant}").model
    want = OFFICIAL[variant]
    abstract = harmon.abstract_params(cfg)   # ShapeDtypeStructs only: nothing allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))

    llm = qwen2_count(*want["llm"], tied=True)
    assert llm == want["llm_total"]          # the published Qwen2.5 sizes
    assert layers.param_count(abstract["llm"]) == llm
    c, de, dd = want["mar"]
    assert layers.param_count(abstract["mar"]) == mar_count(16, c, de, dd, 256, 64)
    depth, width = want["head"]
    assert layers.param_count(abstract["head"]) == head_count(16, width, depth, c)
    projectors = layers.param_count(abstract["proj_in"]) + layers.param_count(abstract["proj_out"])
    assert projectors == proj_count(c, want["llm"][1])


def kl_vae_count(ch=128, mult=(1, 1, 2, 2, 4), n_res=2, e=16, attn_levels=(4,)):
    conv = lambda i, o, k=3: i * o * k * k + o
    res = lambda i, o: 2 * i + conv(i, o) + 2 * o + conv(o, o) + (conv(i, o, 1) if i != o else 0)
    attn = lambda c: 2 * c + 4 * conv(c, c, 1)
    n, c = conv(3, ch), ch
    for lvl, m in enumerate(mult):                      # encoder
        for _ in range(n_res):
            n += res(c, ch * m) + (attn(ch * m) if lvl in attn_levels else 0)
            c = ch * m
        n += conv(c, c) if lvl != len(mult) - 1 else 0
    n += 2 * res(c, c) + attn(c) + 2 * c + conv(c, 2 * e)
    n += conv(2 * e, 2 * e, 1) + conv(e, e, 1)        # quant / post-quant
    n += conv(e, c) + 2 * res(c, c) + attn(c)           # decoder in + mid
    for lvl in reversed(range(len(mult))):
        for _ in range(n_res + 1):
            n += res(c, ch * mult[lvl])
            c = ch * mult[lvl]
        n += conv(c, c) if lvl != 0 else 0
    return n + 2 * c + conv(c, 3)


def test_kl16_parameter_count():
    cfg = config_utils.load_config("configs/harmon.py:1.5b").model
    abstract = jax.eval_shape(lambda: vae.init(cfg.vae, jax.random.key(0)))
    assert layers.param_count(abstract) == kl_vae_count()


@pytest.mark.parametrize("variant", ["tiny", "small", "0.5b", "1.5b"])
def test_variants_validate(variant):
    cfg = config_utils.load_config(f"configs/harmon.py:{variant}").model
    harmon.validate(cfg)


def test_recipes_are_tables_on_a_size():
    """``SIZE,RECIPE...``: each recipe sets exactly its table's fields on the size's config,
    in order; unknown names, and a table naming a field that does not exist, are errors."""
    from configs import grpo
    plain = config_utils.load_config("configs/grpo.py:tiny")
    both = config_utils.load_config("configs/grpo.py:tiny,decoder,retain")
    table = {**grpo.RECIPES["decoder"], **grpo.RECIPES["retain"]}
    flat = lambda c, prefix="": {k2: v2 for k, v in c.items() for k2, v2 in (
        flat(v, f"{prefix}{k}.").items() if hasattr(v, "items") else [(f"{prefix}{k}", v)])}
    before, after = flat(plain), flat(both)
    assert {k for k in after if after[k] != before[k]} == {k for k in table if table[k] != before[k]}
    assert all(after[k] == v for k, v in table.items()) and after["grpo.policy"] == "decoder"
    with pytest.raises(ValueError, match=r"configs/grpo.py: unknown recipe 'decodr'; choose one of"):
        config_utils.load_config("configs/grpo.py:tiny,decodr")
    with pytest.raises(ValueError, match=r"recipe 'x' sets grpo.retain_wieght, which is not a config field"):
        config_utils.apply_table(plain, {"grpo.retain_wieght": 1.0}, "recipe 'x'")
    # The official sizes bring Harmon's recipe; tiny brings the shapes world's.
    assert config_utils.load_config("configs/harmon.py:0.5b").data.image_size == 512
    assert config_utils.load_config("configs/harmon.py:tiny").model.diffusion.prediction == "x0"


def test_resolve_returns_a_frozen_copy_and_leaves_its_argument():
    from ml_collections import FrozenConfigDict

    from unimm import resolve
    config = config_utils.load_config("configs/harmon.py:tiny")
    before = config.to_dict()
    resolved = resolve.resolve(config)
    assert config.to_dict() == before and config.data.image_token_id == -1
    d = resolved.data
    assert isinstance(resolved, FrozenConfigDict) and d.image_token_id >= 0
    assert d.num_image_tokens == 3 * 3 + 4 and d.i2t_seq_len == d.num_image_tokens + d.i2t_text_len
    with pytest.raises(AttributeError):
        resolved.data.image_size = 48
    assert resolve.resolve(resolved).to_dict() == resolved.to_dict()   # idempotent
    thawed = resolve.thaw(resolved)
    thawed.data.image_size = 48   # a copy of its own: the next thaw does not see it
    assert resolve.thaw(resolved).data.image_size == 24 == resolved.data.image_size
    config.model.diffusion.prediction = "noise"
    with pytest.raises(ValueError, match="model.diffusion.prediction"):   # checked first
        resolve.resolve(config)


def test_an_older_config_json_gets_the_fields_added_since():
    """A run's config.json written before a field existed loads: flat GRPO fields move into
    their policy's group (``grpo.prompts`` -> ``grpo.decoder.prompts``), missing fields come
    from the schema, and a missing architecture field is an error naming it."""
    import copy

    from unimm import schema
    current = config_utils.load_config("configs/grpo.py:tiny,decoder,retain").to_dict()
    old = copy.deepcopy(current)
    for group in schema.POLICY_GROUPS:   # the layout before the policy groups
        old["grpo"].update(old["grpo"].pop(group))
    assert old["grpo"]["prompts"] == "geneval" and old["grpo"]["retain_weight"] == 10.0
    assert schema.moved_grpo_field("retain_weight") == "grpo.decoder.retain_weight"
    assert schema.moved_grpo_field("group_size") is None
    del old["optimizer"]["head_lr_scale"]
    assert schema.backfill(ml_collections.ConfigDict(copy.deepcopy(old))).to_dict() == current
    del old["model"]["llm"]["hidden_size"]
    with pytest.raises(KeyError, match="model.llm.hidden_size"):
        schema.backfill(ml_collections.ConfigDict(old))


@pytest.mark.parametrize("variant", ["0.5b", "1.5b"])
def test_official_presets_keep_harmons_masks_and_sampling(variant):
    """The shapes recipe's departures from Harmon (results/generation.md) stay off in the
    official presets: MAR's masks, 4 noise draws per token, epsilon prediction, the
    same diffusion steps in every iteration, images drawn from the prompt (no plan)."""
    c = config_utils.load_config(f"configs/harmon.py:{variant}")
    m = c.model.mar
    assert (m.mask_ratio_dist, m.mask_ratio_per_example, m.mask_ratio_min, m.mask_ratio_std,
            m.mask_full_prob, m.loss_weighting) == ("truncnorm", False, 0.7, 0.25, 0.0, "token")
    assert c.model.diffusion.batch_mul == 4 and c.model.diffusion.prediction == "epsilon"
    assert c.sample.final_sampling_steps == 0 and c.optimizer.head_lr_scale == 1.0
    assert not c.sample.plan and c.data.plan_batch_size == 0     # no planning: drawn from the prompt
