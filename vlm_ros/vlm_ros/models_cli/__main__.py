"""``python -m vlm_ros.models_cli``: the same as the ``vlm_models`` command."""

import sys

from vlm_ros.models_cli.main import main

sys.exit(main())
