"""Training speed-ups that must not change what is trained: the loss-only forward, the constant normaliser,
and the token counts that length grouping and the normaliser read."""
import json

import pytest
import torch
import torch.nn.functional as F

from moe_llava.loading import load_tokenizer
from moe_llava.train.dataset import LlavaCollator
from moe_llava.train.run import StageConfig, build_dataset, training_arguments
from moe_llava.train.stages import Stage
from moe_llava.train.trainer import MoETrainer, constant_normalised_loss
from runtime.prompt import IGNORE_INDEX
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def dataset(dense_dir, tiny_data):
    cfg = StageConfig(stage=Stage.FINETUNE, model=dense_dir, data=tiny_data.instruct_json, out=dense_dir / "unused",
                      image_folder=tiny_data.root)
    return build_dataset(cfg, tiny_model(moe=False), load_tokenizer(dense_dir))


@pytest.fixture(scope="module")
def batch(dataset):
    items = [dataset[i] for i in range(6)]
    assert len({len(it["input_ids"]) for it in items}) > 1  # padding in the batch
    return LlavaCollator(0)(items)


def _loss_and_grads(model, batch, return_logits):
    model.zero_grad()
    out = model(**batch, return_logits=return_logits)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_only_forward_trains_the_same(batch):
    # The LM head on supervised positions only: same loss and gradients as the full-logits forward (the
    # reductions run over fewer zero terms and in another order: float32 rounding, hence 1e-5).
    model = tiny_model(moe=True).train()
    full, full_grads = _loss_and_grads(model, batch, True)
    part, part_grads = _loss_and_grads(model, batch, False)
    assert part.logits is None and full.logits is not None
    torch.testing.assert_close(part.lm_loss, full.lm_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part.aux_loss, full.aux_loss)  # the decoder ran on identical inputs
    assert full_grads.keys() == part_grads.keys() and len(full_grads) > 10
    for name, grad in full_grads.items():
        torch.testing.assert_close(part_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # lm_tokens: answer tokens after the one-position shift, counted here from the collated labels.
    assert part.lm_tokens.item() == full.lm_tokens.item() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()


def test_constant_normaliser_weighs_every_answer_token_the_same(batch):
    model = tiny_model(moe=True).train()
    out = model(**batch)
    logits, labels = out.logits[:, :-1].flatten(0, 1), out_labels(model, batch)
    summed = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")  # independent reference
    aux = model.config.moe.router_aux_loss_coef * out.aux_loss
    for normaliser in (7.0, 50.0):
        torch.testing.assert_close(constant_normalised_loss(out, normaliser), summed / normaliser + aux, rtol=1e-5,
                                   atol=1e-6)
    # Normalising by the batch's own count is the per-batch mean again.
    torch.testing.assert_close(constant_normalised_loss(out, out.lm_tokens.item()), out.loss)


def out_labels(model, batch):
    """The spliced labels shifted by one (what the logits predict), flattened."""
    images = model.encode_images(batch["pixel_values"])
    _, _, labels = model.splice(batch["input_ids"], images, batch["attention_mask"], batch["labels"])
    return labels[:, 1:].flatten()


def test_token_counts_are_the_spliced_lengths(dataset, tiny_data):
    # Length grouping reads these instead of loading every image; they must be what the model will see.
    model = tiny_model(moe=False)
    counts = dataset.token_counts()
    assert len(counts.lengths) == len(dataset) == len(json.loads(tiny_data.instruct_json.read_text()))
    assert any("image" not in r for r in dataset.records)  # text-only records are counted too
    for i in range(len(dataset)):
        item = LlavaCollator(0)([dataset[i]])
        images = model.encode_images(item["pixel_values"]) if item["pixel_values"] is not None else None
        embeds, _, labels = model.splice(item["input_ids"], images, item["attention_mask"], item["labels"])
        assert counts.lengths[i] == embeds.shape[1]
        assert counts.supervised[i] == (labels[:, 1:] != IGNORE_INDEX).sum().item()


def _padding(lengths, order, batch):
    """Padded positions when `order` is cut into batches of `batch`."""
    chunks = [[lengths[i] for i in order[k:k + batch]] for k in range(0, len(order), batch)]
    return sum(max(c) * len(c) - sum(c) for c in chunks)


def test_length_grouped_sampler_reads_the_counts_not_the_images(dense_dir, tiny_data, tmp_path):
    cfg = StageConfig(stage=Stage.FINETUNE, model=dense_dir, data=tiny_data.instruct_json, out=tmp_path,
                      image_folder=tiny_data.root, batch_size=4, global_batch_size=4, cache_images=True,
                      group_by_length=True, progress=False)
    model = tiny_model(moe=False)
    data = build_dataset(cfg, model, load_tokenizer(dense_dir))
    trainer = MoETrainer(model=model, args=training_arguments(cfg), train_dataset=data, data_collator=LlavaCollator(0))
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(len(data)))
    assert not data._cache  # no image was loaded to learn the lengths
    lengths = data.token_counts().lengths
    assert _padding(lengths, order, 4) < 0.5 * _padding(lengths, list(range(len(data))), 4)
