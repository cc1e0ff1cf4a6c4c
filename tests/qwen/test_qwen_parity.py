"""Our Qwen-1 (transformers Qwen2 modules + key mapping) equals an independent Qwen-1 written from the facts."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from moe_llava.loading import load_pretrained
from qwen1_reference import Qwen1Reference
from runtime.errors import UserError
from tiny import write_tiny_checkpoint

# fp32 model vs float64 reference, logits of magnitude ~1-10: what is left is fp32 rounding
ATOL = 2e-5


@pytest.fixture(scope="module", params=[True, False], ids=["moe", "dense"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen")
    write_tiny_checkpoint(directory, "qwen", seed=3, moe=request.param)
    loaded = load_pretrained(directory)
    reference = Qwen1Reference(load_file(directory / "model.safetensors"), loaded.config.backbone)
    return loaded, reference


def ours_step(model, embeds, cache):
    with torch.no_grad():
        logits, cache = model.decode_embeds(embeds[None].float(), past_key_values=cache, use_cache=True)
    return logits[0].double(), cache


def test_prefill_and_cached_decode_match_the_reference(checkpoint):
    loaded, reference = checkpoint
    model = loaded.model
    reference.reset()
    ids = [7, 30, 2, 99, 5, 300, 41, 8, 13]
    embeds = model.embed_tokens(torch.tensor(ids)).detach()
    assert torch.equal(embeds.double(), reference.embed(ids))
    got, cache = ours_step(model, embeds, DynamicCache(config=model.language_model.config))
    want = reference.forward(embeds)
    worst = (got - want).abs().max().item()
    for token in (17, 250, 3):  # one token at a time against the cache, as generation runs
        step = model.embed_tokens(torch.tensor([token])).detach()
        got, cache = ours_step(model, step, cache)
        want = reference.forward(step)
        worst = max(worst, (got - want).abs().max().item())
    assert worst < ATOL, worst


def test_multimodal_forward_matches_the_reference(checkpoint):
    """Visual tokens spliced at -200 go through the same decoder: the whole sequence's logits agree."""
    loaded, reference = checkpoint
    model = loaded.model
    reference.reset()
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        got = model(torch.tensor([[11, 12, -200, 13, 14]]), pixels).logits[0].double()
        visual = model.encode_images(pixels)[0]
    text = model.embed_tokens(torch.tensor([11, 12, 13, 14]))
    embeds = torch.cat([text[:2], visual, text[2:]]).detach()
    want = reference.forward(embeds, use_cache=False)
    assert (got - want).abs().max().item() < ATOL


def test_context_is_capped_at_seq_length(checkpoint):
    """Up to seq_length positions we equal Qwen-1; one more is a UserError (where Qwen-1 would switch to
    dynamic NTK + log-n scaling, which visibly changes its output)."""
    loaded, reference = checkpoint
    model = loaded.model
    limit = int(loaded.config.backbone["seq_length"])
    torch.manual_seed(1)
    embeds = model.embed_tokens(torch.randint(0, 400, (limit,))).detach()
    reference.reset()
    got, cache = ours_step(model, embeds, DynamicCache(config=model.language_model.config))
    assert (got - reference.forward(embeds)).abs().max().item() < ATOL
    with pytest.raises(UserError, match="seq_length"):
        ours_step(model, embeds[:1], cache)
    with pytest.raises(UserError, match="seq_length"):
        ours_step(model, torch.cat([embeds, embeds[:1]]), None)
    # why the cap: past seq_length the reference no longer computes plain rotary attention
    longer = torch.cat([embeds, embeds[:8]])
    reference.reset()
    scaled = reference.forward(longer, use_cache=False)
    reference.ntk = reference.logn = False
    plain = reference.forward(longer, use_cache=False)
    reference.ntk = reference.logn = True
    assert (scaled - plain).abs().max().item() > 1e-2
