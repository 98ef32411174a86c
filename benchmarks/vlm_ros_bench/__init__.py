"""
Benchmarks of vlm_ros at real model sizes (development tooling: may import torch).

Modules:
    models        -- random-weight SmolVLM2-256M / -500M at the published configs, exported
                     once through the project's own exporters and cached in .cache/bench_models.
    paths         -- the measured paths (transformers, ONNX Runtime, llama.cpp, libmtmd, raw).
    worker        -- runs one path in its own process and reports per-repetition timings.
    hardware      -- machine facts, memory read bandwidth and matmul throughput.
    roofline      -- bytes read per decoded token and FLOPs of vision and prefill.
    ros_overhead  -- the node's Query round trip minus the engine's own total_ms.
    report        -- statistics, the JSON document, the markdown table and the chart.
    schema        -- the JSON document's schema check.
    profile_decode -- cProfile of our decode loop (per-token overhead of our own code).
    qwen2vl       -- the Qwen2-VL run (``python -m vlm_ros_bench qwen2vl``): random weights at
                     Qwen2-VL-2B's shapes (qwen2vl_models) on our ONNX vision encoder, libmtmd
                     and raw llama.cpp with a Q4_0 GGUF, and transformers (qwen2vl_worker).

Nothing here is imported by the runtime package.
"""

SCHEMA_VERSION = 2
