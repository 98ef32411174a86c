"""
Model families: preprocessing, prompt layout, chat template and special tokens.

One module per family; ``registry`` finds them by the ``FamilyInfo`` they declare.
"""

from vlm_ros.engine.families.registry import load_family  # noqa: F401  (the usual entry)
