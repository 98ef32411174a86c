"""
From a ``ModelSpec`` to a ready ``Answerer``: the runtime sessions, or a server's client.

``pipeline()`` (``vlm_ros.pipeline``) is ``build(resolve(...))``; the node resolves at
configure and builds at activate, so both load a model the same way.
"""

from typing import Optional, Sequence

from vlm_ros.engine import memory
from vlm_ros.engine.answerer import Answerer
from vlm_ros.engine.datatypes import GenerationConfig, ImageOptions
from vlm_ros.engine.families import registry
from vlm_ros.engine.model_spec import ModelSpec, resolve, RUNTIME_LLAMACPP, RUNTIME_MTMD


def build(spec: ModelSpec, *, n_threads: int = 0, n_ctx: int = 0,
          providers: Optional[Sequence[str]] = None, kv_type: str = 'f16',
          max_beams: int = 4, defaults: Optional[GenerationConfig] = None,
          image_options: Optional[ImageOptions] = None, feature_cache_mb: float = 64,
          kv_cache_slots: int = 2, n_gpu_layers: int = 0,
          max_concurrent: int = 1) -> Answerer:
    """
    Create what answers for ``spec``: a ``Pipeline`` over its runtimes, or a ``RemoteClient``.

    ``n_threads`` 0 uses every core; ``n_ctx`` sets a llama.cpp context (0: the model's);
    ``kv_type`` its KV cache precision (``f32`` for exact comparisons); ``max_beams`` the
    widest beam search a llama.cpp decoder allows; ``providers`` ONNX Runtime's execution
    providers. ``defaults`` are the generation settings requests start from.
    ``feature_cache_mb`` bounds the image-feature cache and ``kv_cache_slots`` is how many
    recent sequences the decoder keeps for prefix reuse (0 turns each off; see ``caches``).
    ``n_gpu_layers`` offloads llama.cpp layers (and its projector) to a GPU build's device
    (-1: all); ``providers`` orders ONNX Runtime's execution providers (e.g.
    ``['CUDAExecutionProvider', 'CPUExecutionProvider']``; unavailable ones are skipped with
    a warning). ``max_concurrent`` requests decode together on a llama.cpp decoder
    (continuous batching; an ONNX decoder answers one at a time whatever it says).
    """
    defaults = defaults or GenerationConfig()
    if spec.is_remote:
        from vlm_ros.engine.remote import RemoteClient
        r = spec.remote
        return RemoteClient(r.url, r.model, api_key_env=r.api_key_env,
                            connect_timeout_s=r.connect_timeout_s,
                            read_timeout_s=r.read_timeout_s, max_retries=r.max_retries,
                            image_max_side=r.image_max_side, defaults=defaults,
                            box_format=r.box_format, image_format=r.image_format)
    from vlm_ros.engine.pipeline import Pipeline
    memory.map_big_blocks()
    max_beams = max(max_beams, defaults.num_beams)
    family_class = registry.by_key(spec.family)
    if spec.vision_runtime == RUNTIME_MTMD:
        from vlm_ros.engine.families.gguf_chat import GgufChatFamily
        from vlm_ros.engine.runtimes.llamacpp import LlamaCppDecoder
        from vlm_ros.engine.runtimes.mtmd import MtmdImageEncoder, MtmdVision
        decoder = LlamaCppDecoder(spec.decoder, n_threads, n_ctx, max_beams=max_beams,
                                  kv_type=kv_type, kv_cache_slots=kv_cache_slots,
                                  n_gpu_layers=n_gpu_layers, max_concurrent=max_concurrent)
        # With the model's own folder, libmtmd sizes images within its processor's budget.
        bounds = None
        if spec.model_dir and (spec.model_dir / 'config.json').is_file():
            bounds = family_class(spec.model_dir).image_token_bounds()
        encoder = MtmdImageEncoder(spec.vision, decoder, n_threads, image_tokens=bounds)
        # One registered family may answer differently per checkpoint (Qwen2-VL's box
        # tokens, Qwen2.5-VL's JSON): the projector type tells which.
        info = family_class.info_for(encoder.projector_type)
        family = GgufChatFamily(spec.decoder, decoder, info)
        vision = MtmdVision(encoder, info.image_placeholder,
                            family_class.mtmd_image_fitter(bounds))
        memory.trim()
        return Pipeline(family, vision, decoder, defaults, image_options, feature_cache_mb)

    from vlm_ros.engine.model_files import load_json, text_config
    from vlm_ros.engine.runtimes.onnx import OnnxDecoder, OnnxVisionEncoder, SessionOptions
    family = family_class(spec.model_dir)
    options = SessionOptions(n_threads, providers)
    # The vision encoder first, then a trim: the parsed graph ONNX Runtime leaves behind goes
    # back before the decoder's memory comes on top (SmolVLM2-256M int8 + Q8_0, 2 cores: peak
    # while loading 584 -> 464 MB).
    vision = OnnxVisionEncoder(spec.vision, options, family.text_hidden_size,
                               family.vision_heads, family.vision_hidden_size)
    memory.trim()
    if spec.decoder_runtime == RUNTIME_LLAMACPP:
        from vlm_ros.engine.runtimes.llamacpp import LlamaCppDecoder
        decoder = LlamaCppDecoder(spec.decoder, n_threads, n_ctx,
                                  expected_hidden_size=family.text_hidden_size,
                                  max_beams=max_beams, kv_type=kv_type,
                                  kv_cache_slots=kv_cache_slots, n_gpu_layers=n_gpu_layers,
                                  max_concurrent=max_concurrent)
    else:
        text = text_config(load_json(spec.model_dir, 'config.json'))
        decoder = OnnxDecoder(spec.embed, spec.decoder, options,
                              hidden_size=family.text_hidden_size,
                              num_layers=text.get('num_hidden_layers', 0),
                              context_length=family.context_length,
                              kv_cache_slots=kv_cache_slots)
    memory.trim()
    return Pipeline(family, vision, decoder, defaults, image_options, feature_cache_mb)


def pipeline(model_dir=None, *, vision_model=None, decoder_model=None, embed_model=None,
             variant='fp32', model_type=None, n_threads=0, n_ctx=0, providers=None,
             kv_type='f16', max_beams=4, image_options=None, feature_cache_mb=64,
             kv_cache_slots=2, n_gpu_layers=0, max_concurrent=1, **generation):
    """
    Load a model, ready to answer (``vlm_ros.pipeline``).

    The runtime follows the files (see ``model_spec``): an ONNX decoder runs in ONNX
    Runtime, a ``.gguf`` decoder in llama.cpp; an ONNX vision encoder feeds either, while an
    mmproj ``.gguf`` vision model lets llama.cpp's own projector encode the image (then
    ``model_dir`` may be omitted: the GGUFs carry tokenizer and chat template).

    ``variant`` picks the ONNX precision (``fp32``, ``fp16``, ``int8``, ``q4``, ...) when
    files are not named; paths are relative to ``model_dir``. ``model_type`` names the family
    (e.g. ``smolvlm``, ``internvl``; None: the files decide). Runtime settings are those of
    ``build``; remaining keyword arguments are default generation settings (see
    GenerationConfig).
    """
    spec = resolve(model_dir, vision_model=vision_model, decoder_model=decoder_model,
                   embed_model=embed_model, variant=variant, model_type=model_type)
    return build(spec, n_threads=n_threads, n_ctx=n_ctx, providers=providers,
                 kv_type=kv_type, max_beams=max_beams,
                 defaults=GenerationConfig(**generation).validate(),
                 image_options=image_options, feature_cache_mb=feature_cache_mb,
                 kv_cache_slots=kv_cache_slots, n_gpu_layers=n_gpu_layers,
                 max_concurrent=max_concurrent)
