"""The three MoE-Tuning stages: what trains, with which template, and the reference hyper-parameters.

  I   pretrain  projector only                        plain template, captions     lr 1e-3, batch 256
  II  finetune  LLM + projector (vision frozen)       chat template, instructions  lr 2e-5, batch 128
  III moe       MoE layers only (experts + routers)   chat template, instructions  lr 2e-5, batch 128,
                upcycled from stage II, + router_aux_loss_coef * aux loss, capacity_factor 1.5
All stages: one epoch, cosine schedule, 3 % warm-up, no weight decay (the reference scripts).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

from torch import nn

from runtime.prompt import Template, template_for

from ..model import MoELlavaForCausalLM


class Stage(IntEnum):
    PRETRAIN = 1
    FINETUNE = 2
    MOE = 3


class Group(str, Enum):
    """Parameter groups a stage can train."""
    VISION_TOWER = "vision_tower"
    PROJECTOR = "projector"
    LANGUAGE_MODEL = "language_model"
    MOE = "moe"  # router + experts of every MoE layer


class LossNormaliser(str, Enum):
    """What divides a batch's summed LM loss: its own answer-token count (the reference), or one constant
    (the data set's mean answer tokens per sample x micro-batch) - needed with --group-by-length."""
    BATCH_MEAN = "batch-mean"
    CONSTANT = "constant"


@dataclass(frozen=True)
class StageSpec:
    stage: Stage
    name: str
    groups: tuple[Group, ...]
    learning_rate: float
    global_batch_size: int
    plain_template: bool
    moe: bool               # the stage trains an MoE model (upcycled from a dense one)
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    data: str = "instruct"  # which kind of data the stage expects: "captions" or "instruct"

    def template(self, model_type: str) -> Template:
        return Template.PLAIN if self.plain_template else template_for(model_type)


STAGES = {
    Stage.PRETRAIN: StageSpec(Stage.PRETRAIN, "pretrain", (Group.PROJECTOR,), 1e-3, 256, True, False,
                              data="captions"),
    Stage.FINETUNE: StageSpec(Stage.FINETUNE, "finetune", (Group.PROJECTOR, Group.LANGUAGE_MODEL), 2e-5, 128,
                              False, False),
    Stage.MOE: StageSpec(Stage.MOE, "moe", (Group.MOE,), 2e-5, 128, False, True),
}


def group_modules(model: MoELlavaForCausalLM, group: Group) -> list[nn.Module]:
    if group is Group.MOE:
        return list(model.moe_layers())
    return [getattr(model, group.value)]


def apply_freezing(model: MoELlavaForCausalLM, groups: tuple[Group, ...] | list[Group]) -> list[str]:
    """requires_grad only for the parameters of `groups`; returns the trainable parameter names."""
    model.requires_grad_(False)
    for group in groups:
        for module in group_modules(model, Group(group)):
            module.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def moe_parameter_names(model: MoELlavaForCausalLM) -> set[str]:
    ids = {id(p) for layer in model.moe_layers() for p in layer.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
