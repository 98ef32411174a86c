"""
``vlm_serve``: the engine behind an OpenAI-compatible HTTP API (no ROS).

An adapter over the engine, a peer of ``ros/``: ``main`` reads the command line (or a node
parameters file) and loads one model, ``app`` serves it with Starlette on uvicorn.

    main.py           command line, model loading, uvicorn
    settings.py       the node's parameters YAML and the embedded default model
    app.py            routes: /v1/chat/completions, /v1/models, /health, /metrics
    chat_request.py   an OpenAI chat request -> one engine call (turns, images, settings)
    image_sources.py  image_url -> bytes: data: URLs, and http(s) / file:// when enabled
    scheduler.py      the bounded queue and the one worker thread that runs the model
    responses.py      Result and text deltas -> OpenAI completion objects and chunks
    metrics.py        Prometheus counters and histograms
    api_errors.py     the OpenAI error shape, and engine errors -> HTTP statuses
"""
