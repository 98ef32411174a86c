"""``python -m vlm_ros.serve``: the same as the ``vlm_serve`` executable."""

import sys

from vlm_ros.serve.main import main

sys.exit(main())
