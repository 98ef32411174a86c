"""
Test and development tooling for vlm_ros (needs PyTorch; never imported at run time).

Modules:
    tiny_tokenizer   -- a small byte-level BPE tokenizer with SmolVLM's special tokens.
    hub_files        -- what the factories share: json, seeded weights, hub-layout saving,
                        loading the transformers processor (with or without torchvision).
    smolvlm_factory  -- tiny random-weight SmolVLM checkpoints in the hub file layout.
    export_onnx      -- ONNX export with the official hub graph names, plus a model cache.
    check_export     -- end-to-end parity check of the exported graphs against transformers.
    model_cache      -- the cached test models by name without torch (manifest), for the
                        Humble stand-in; with torch it builds through the exporters above.
    scenes           -- the default model's synthetic shape scenes and questions (seeded).
    drawn_scenes     -- the same kind of scenes from a second, independent renderer.
    train_default    -- trains, exports and ships the embedded default model.
    eval_default     -- its accuracy and box overlap on either kind of scene.
"""
