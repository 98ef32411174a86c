"""vlm_ros: ask a small vision-language model about an image, with or without ROS."""

__version__ = '0.1.0'


def pipeline(model_dir, **kwargs):
    """
    Load a model for answering questions about images (see engine.loader.pipeline).

    >>> pipe = vlm_ros.pipeline('SmolVLM2-256M-Video-Instruct')
    >>> pipe(('Describe this image.', image)).text
    """
    from vlm_ros.engine.loader import pipeline as load
    return load(model_dir, **kwargs)
