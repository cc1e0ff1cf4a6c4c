"""MoE-Tuning: the three training stages of MoE-LLaVA on the HF Trainer, the demo recipe and evaluation.

dataset.py   LLaVA-JSON -> (input_ids, labels, pixel_values) + the batch collator
stages.py    what each stage trains (parameter groups), its reference hyper-parameters and template
upcycle.py   stage III initialisation: dense FFN -> E identical experts + a fresh router
init.py      stage I initialisation from a plain transformers LLM + a CLIP/SigLIP tower
trainer.py   HF Trainer subclass: LM and aux loss logged apart, checkpoints in the official layout
run.py       one stage end to end (model in -> trained checkpoint dir + loss curve + JSON log)
tower.py     demo only: supervised pre-training of the from-scratch vision tower
recipes.py   the demo recipe (synthetic data -> tower -> stages I, II, III -> evaluation)
evaluate.py  POPE, open questions and routing statistics with greedy decoding
generate.py  batched greedy decoding on the PyTorch model
plots.py     loss curves and the expert-loading figure
command.py   moe-train / moe-eval argument parsing
"""
