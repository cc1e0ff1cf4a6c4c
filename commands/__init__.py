"""One module per console script (`moe-run`, `moe-export`): `build_parser()` and `main(args)`.

The other commands follow the same shape in the package they drive: benchmarks/command.py (`moe-bench`),
moe_llava/train/command.py (`moe-train`) and moe_llava/train/eval_command.py (`moe-eval`). cli.py only wires
them to their console scripts.
"""
