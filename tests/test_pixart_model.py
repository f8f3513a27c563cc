"""The PixArt transformer: shapes, parameter counts, initialisation, masks, dropout, checkpointing, errors."""

import pytest
import torch
from conftest import random_inputs, random_model, tiny_config
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from models.embeddings import sincos_pos_embed_2d
from models.pixart import PIXART_ARCHS, PixArtConfig, build_pixart


def test_xl2_parameter_count_matches_paper():
    model = build_pixart(PixArtConfig(arch="XL", micro_conditions=True, latent_size=128), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 611_349_152
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 21_255_552
    assert model.y_embedder.y_embedding.shape == (120, 4096)  # a buffer, not a parameter (never trained)


@pytest.mark.parametrize("arch", sorted(PIXART_ARCHS))
def test_registry_sizes_build(arch):
    depth, hidden, heads = PIXART_ARCHS[arch]
    model = build_pixart(PixArtConfig(arch=arch), device="meta")
    assert len(model.blocks) == depth and model.hidden_size == hidden
    assert model.blocks[0].attn.num_heads == heads


@pytest.mark.parametrize("micro", [False, True])
@pytest.mark.parametrize("hw", [(16, 16), (16, 24), (24, 16), (8, 32), (2, 2)])
def test_forward_shapes_any_size_and_aspect(micro, hw):
    cfg = tiny_config(micro_conditions=micro)
    model = random_model(cfg)
    x, t, y, mask, kw = random_inputs(cfg, height=hw[0], width=hw[1])
    with torch.no_grad():
        out = model(x, t, y, mask, **kw)
    assert out.shape == (2, 8, *hw)
    assert torch.isfinite(out).all()


def test_no_learned_sigma_and_other_patch_size():
    cfg = tiny_config(learn_sigma=False, patch_size=4, in_channels=3)
    model = random_model(cfg)
    x, t, y, mask, _ = random_inputs(cfg, height=16, width=8)
    assert model(x, t, y, mask).shape == (2, 3, 16, 8)


def test_fresh_model_predicts_zero_and_ignores_caption():
    cfg = tiny_config()
    model = build_pixart(cfg).eval()
    x, t, y, mask, _ = random_inputs(cfg)
    with torch.no_grad():
        assert model(x, t, y, mask).abs().max() == 0  # zero-initialised output projection
        model.final_layer.linear.weight.normal_()
        a, b = model(x, t, y, mask), model(x, t, torch.randn_like(y), mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # zero-initialised cross-attention output


def test_padded_caption_tokens_are_ignored():
    cfg = tiny_config()
    model = random_model(cfg)
    x, t, y, mask, _ = random_inputs(cfg)
    y2 = y.clone()
    y2[0, cfg.caption_tokens // 2:] = 100.0  # only padding of sample 0 changes
    with torch.no_grad():
        a, b = model(x, t, y, mask), model(x, t, y2, mask)
    torch.testing.assert_close(a, b)
    with torch.no_grad():
        c = model(x, t, y2)  # no mask: the change must now matter
    assert (a[0] - c[0]).abs().max() > 1e-3


def test_drop_caption_uses_null_caption():
    cfg = tiny_config()
    model = random_model(cfg)
    x, t, y, mask, _ = random_inputs(cfg)
    null = model.y_embedder.y_embedding.expand_as(y)
    drop = torch.tensor([True, False])
    with torch.no_grad():
        dropped = model(x, t, y, mask, drop_caption=drop)
        expect = model(x, t, torch.stack([null[0], y[1]]), mask)
    torch.testing.assert_close(dropped, expect, rtol=0, atol=0)


def test_batch_rows_are_independent():
    cfg = tiny_config(micro_conditions=True)
    model = random_model(cfg)
    x, t, y, mask, kw = random_inputs(cfg, batch=3)
    with torch.no_grad():
        full = model(x, t, y, mask, **kw)
        one = model(x[1:2], t[1:2], y[1:2], mask[1:2], **{k: v[1:2] for k, v in kw.items()})
    torch.testing.assert_close(full[1:2], one, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_same_gradients():
    cfg = tiny_config()
    grads = []
    for ckpt in (False, True):
        model = random_model(cfg).train()
        model.gradient_checkpointing = ckpt
        x, t, y, mask, _ = random_inputs(cfg)
        model(x, t, y, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("grid,base,scale", [((8, 8), 8, 1.0), ((8, 12), 8, 0.5), ((16, 6), 32, 2.0)])
def test_positional_embedding_matches_diffusers(grid, base, scale):
    ours = sincos_pos_embed_2d(48, grid[0], grid[1], base, scale)
    ref = get_2d_sincos_pos_embed(48, grid, base_size=base, interpolation_scale=scale, output_type="pt")
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=1e-6)


def test_bad_latent_size_names_nearest_valid_sizes():
    model = random_model(tiny_config())
    x, t, y, mask, _ = random_inputs(tiny_config(), height=17, width=16)
    with pytest.raises(ValueError, match=r"latent size 17x16 is not a multiple of the patch size 2.*\[16, 18\]"):
        model(x, t, y, mask)


def test_wrong_channels_and_caption_width_are_named():
    cfg = tiny_config()
    model = random_model(cfg)
    x, t, y, mask, _ = random_inputs(cfg)
    with pytest.raises(ValueError, match=r"expected latents of shape \(N, 4, H, W\)"):
        model(x[:, :3], t, y, mask)
    with pytest.raises(ValueError, match=r"expected caption features \(N, L, 32\)"):
        model(x, t, y[..., :16], mask)


def test_ms_model_requires_micro_conditions():
    cfg = tiny_config(micro_conditions=True)
    model = random_model(cfg)
    x, t, y, mask, _ = random_inputs(cfg)
    with pytest.raises(ValueError, match="multi-scale.*resolution"):
        model(x, t, y, mask)


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown model.arch 'XXL'.*XL"):
        build_pixart(PixArtConfig(arch="XXL"), device="meta")


def test_a_deepened_model_computes_what_the_original_does():
    """models/pixart.py deepened: new blocks spread evenly with zero output projections pass their tokens through, so
    the deeper model's output equals the original's exactly (and its cfg says the new depth); once a new block's
    projections are non-zero the outputs differ, and a shallower depth is refused."""
    from common.errors import UserError
    from models.pixart import deepened, identity_block_positions

    assert identity_block_positions(6, 8) == [3, 7] and identity_block_positions(6, 9) == [2, 5, 8]
    assert identity_block_positions(2, 3) == [2]
    cfg = tiny_config()
    net = random_model(cfg, seed=3, std=0.05)
    x, t, y, mask, _ = random_inputs(cfg, batch=2)
    deep = deepened(net, len(net.blocks) + 2)
    assert len(deep.blocks) == len(net.blocks) + 2 and deep.cfg.depth == len(net.blocks) + 2
    with torch.no_grad():
        torch.testing.assert_close(deep(x, t, y, mask), net(x, t, y, mask), rtol=0, atol=0)
        new = identity_block_positions(len(net.blocks), len(deep.blocks))[0]
        deep.blocks[new].mlp.fc2.weight.normal_()
        assert not torch.allclose(deep(x, t, y, mask), net(x, t, y, mask))
    with pytest.raises(UserError, match="cannot deepen"):
        deepened(net, len(net.blocks) - 1)
