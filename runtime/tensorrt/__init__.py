"""The TensorRT backend (`moe-run --backend tensorrt`), one job per module:

  libraries     tensorrt / cuda-python imported lazily, the process's logger, plugin registration
  engine_set    the manifest's `engines` section and its compatibility checks
  memory        device-memory arithmetic shared with the memory plan (KV cache, MoE plugin workspace)
  kv_layout     where the decoder's tensors live and the bindings of one step (pure)
  cuda          the CUDA runtime calls (Cuda)
  engine_reader deserialising an engine file without a whole-file host copy
  parts         a deserialised engine (TrtPart) and an execution context on one profile (TrtRunner)
  encoders      vision -> projector (TrtImageEncoder), the embedding table (TrtEmbedder)
  decoder       the decoder over the device KV cache (TrtDeviceDecoder), its CUDA graphs (DecodeGraphs)
  engine        TrtEngine, the runtime.engine.Engine the pipeline drives
"""
