"""The HF Trainer, adapted: LM loss and router aux loss logged apart, checkpoints in the official layout.

Every `checkpoint-N/` (and the final save) is an official MoE-LLaVA checkpoint directory (config.json with
the `moe` dict, `deepspeed_moe` keys, tokenizer files) next to the Trainer's optimizer / scheduler / RNG
state, so an intermediate checkpoint loads with `load_pretrained`, `moe-run --model` and `moe-export`, and
`trainer.train(resume_from_checkpoint=...)` resumes from it. Distribution (torchrun / accelerate launch)
is the Trainer's business (see distributed.py); here only the first process writes (`should_save`) and the
logged loss parts are means over all processes, like the Trainer's own `loss`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..checkpoint import load_official_state, read_state_dict
from ..loading import save_pretrained

TRAINING_ARGS_NAME = "training_args.bin"


class MoETrainer(Trainer):
    """`loss_normaliser` (supervised tokens per micro-batch, e.g. the data set's mean x batch size): divide
    each batch's summed LM loss by this constant instead of by its own token count, so that every token
    weighs the same whatever batch it lands in - what length-grouped batches need (a batch of short
    answers would otherwise count each of its tokens more). None: the per-batch mean."""

    def __init__(self, *args, tokenizer_dir: Path | None = None, loss_normaliser: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer_dir = tokenizer_dir
        self.loss_normaliser = loss_normaliser
        # Our loss is a per-batch mean that ignores num_items_in_batch: let the Trainer scale it for GA.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._parts: dict[str, list[float]] = {"lm_loss": [], "aux_loss": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, return_logits=return_outputs)
        self._parts["lm_loss"].append(outputs.lm_loss.detach().float().item())
        if outputs.aux_loss is not None:
            self._parts["aux_loss"].append(outputs.aux_loss.detach().float().item())
        loss = outputs.loss if not self.loss_normaliser else constant_normalised_loss(outputs, self.loss_normaliser)
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        """Length grouping from the data set's own token counts (image slots counted as their visual
        tokens), instead of the Trainer's pass over every item, which would load every image."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "token_counts"):
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(batch, lengths=dataset.token_counts().lengths)
        return super()._get_train_sampler(train_dataset)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the mean of each loss part since the last one
            for name, values in self._parts.items():
                if values:  # every process logs together, so the mean over processes is a collective
                    local = torch.tensor(sum(values) / len(values), device=self.args.device)
                    logs[name] = round(self.accelerator.reduce(local, "mean").item(), 6)
                values.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_pretrained(model, output_dir, self.tokenizer_dir, state_dict=state_dict)  # FSDP: gathered by HF
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_official_state(model, read_state_dict(Path(resume_from_checkpoint)), tower_from_checkpoint=True)


def constant_normalised_loss(outputs, normaliser: float) -> torch.Tensor:
    """The batch's summed LM loss / normaliser (in place of its mean) + the weighted aux loss, unchanged."""
    return outputs.loss + outputs.lm_loss * (outputs.lm_tokens / normaliser - 1)


class JsonLogCallback(TrainerCallback):
    """Appends every log record to `path` (JSON list) as training goes, on the main process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume, start from what the checkpoint's trainer state already logged.
        self.records = [dict(r) for r in state.log_history]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.records.append({**logs, "step": state.global_step})
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.records, indent=1) + "\n")
