"""The adapter base: a model family is one short declaration, whether built in or added by a plugin."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock
from plugin_helpers import plugin

import tokred
from tokred.adapters.base import Adapter, BlockPattern, SiteRule
from tokred.adapters.hooks import TokenSiteHook, tokred_hooks
from tokred.errors import ConfigError


class DiTAdapter(Adapter):
    """Class-conditional DiT (``DiTTransformer2DModel``): the self-attention of every block, on the patch grid."""

    label = "DiT"
    model_types = (DiTTransformer2DModel,)
    patterns = (
        BlockPattern(
            family="dit",
            container="transformer_blocks",
            types=(BasicTransformerBlock,),
            sites=(SiteRule("attn1", "attn1", {"tokens": lambda e, s, c: TokenSiteHook(e, s, c, "tokens")}),),
        ),
    )

    def read_grid(self, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        patch = 2
        return hidden.shape[-2] // patch, hidden.shape[-1] // patch


def dit_plugin():
    def register_adapters(register):
        register("dit", DiTAdapter, description="class-conditional DiT")

    def resolve_adapter(model):
        return "dit" if DiTAdapter.handles(model) else None

    return plugin("dit-plugin", register_adapters=register_adapters, resolve_adapter=resolve_adapter)


@pytest.fixture
def registries(make_registries):
    return make_registries(dit_plugin(), builtins=True)


def tiny_dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=8,
    ).eval()


def test_a_family_declared_on_the_base_reduces_and_removes_exactly(registries):
    model = tiny_dit()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([10, 10]), torch.tensor([1, 2])
    with torch.no_grad():
        base = model(x, t, labels).sample
        with tokred.patched(model, "toma", ratio=0.5, registries=registries) as patch:
            out = model(x, t, labels).sample
            assert patch.adapter == "dit"
            assert [site.block for site in patch.sites] == [0, 1, 2]
            assert {site.family for site in patch.sites} == {"dit"}
            assert patch.stats.total.tokens_in == 3 * 64 and patch.stats.total.tokens_out == 3 * 32
        assert not tokred_hooks(model)
        assert torch.equal(model(x, t, labels).sample, base)
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_the_base_refuses_sites_and_modes_the_family_does_not_declare(registries):
    model = tiny_dit()
    with pytest.raises(ConfigError, match=r"DiT has no ff site; its sites: attn1"):
        tokred.apply(model, "toma", sites=["attn1", "ff"], registries=registries)
    with pytest.raises(ConfigError, match=r"attn1 cannot run in mode kv on DiT.*sites that can: none"):
        tokred.apply(model, "toma", mode="kv", registries=registries)
    assert not tokred_hooks(model)


def test_a_config_can_name_the_adapter(registries):
    model = tiny_dit()
    with tokred.patched(model, "toma", adapter="dit", registries=registries) as patch:
        assert patch.adapter == "dit"
    with pytest.raises(tokred.TokredError, match=r"adapter .flux. .* does not handle DiTTransformer2DModel"):
        tokred.apply(model, "toma", adapter="flux", registries=registries)
    with pytest.raises(ConfigError, match=r"unknown adapter .fluxx. .*did you mean .flux."):
        tokred.apply(model, "toma", adapter="fluxx", registries=registries)
