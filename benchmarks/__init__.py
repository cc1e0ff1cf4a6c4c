"""Every benchmark: moe-bench (latency and memory of the runtime against PyTorch on the same model and inputs)
and the scripts beside it.

  command.py   the `moe-bench` parser and command (a thin layer over the functions below)
  measure.py   one backend's measurement in its own process; interleaved rounds across processes
  roofline.py  weight bytes read per decode token (active experts only), copy bandwidth, the decode ceiling
  synthetic.py random StableLM-shaped checkpoints of a named size (scaling study, the ~300M roofline check)
  scaling.py   the E in {4, 8, 16} study at equal active size
  report.py    the printed table and the PNG charts
  machine.py   what the figures were measured on
  moe_scaling.py    script: the scaling study / one synthetic checkpoint (`--write-checkpoint`, used by make demo)
  plugin_kernels.py script: the TensorRT plugin's CUDA kernels against cuBLAS (needs a GPU)

Nothing here imports torch, transformers or onnxruntime at module level: the runtime's measurement process
must not load torch, or its memory would count against the runtime.
"""
