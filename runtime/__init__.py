"""Torch-free inference runtime: numpy, Pillow, tokenizers and one engine library (imported lazily).

Modules: preprocess (images), prompt (templates), sampling, engine (the Engine protocol), generation
(Pipeline), manifest (export directory), ort_engine + kv_cache (ONNX Runtime), pipeline (load_pipeline),
cli_output (what moe-run prints). Nothing is imported here so `import runtime` stays cheap.
"""
