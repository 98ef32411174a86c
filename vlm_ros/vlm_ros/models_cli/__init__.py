"""
``vlm_models``: fetch, check and (on a workstation) export the files of a model configuration.

Each supported configuration is one of the node's parameter files in ``config/``; the
catalogue (``config/catalogue/models.yaml``) says which hub repositories and files it needs.
``list`` shows them, ``download`` fetches them resumably through huggingface_hub's endpoint,
token and offline settings and checks every byte against the hub's metadata, ``verify``
checks a folder against the configuration, and ``export`` produces, with PyTorch, the files
no hub publishes. No ROS import: it runs on a robot before the node ever starts.
"""
