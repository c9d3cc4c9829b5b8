"""``python -m tfserving_standin``: what ``tensorflow_model_server`` runs in the stand-in image."""

import sys

from .server import main

sys.exit(main(sys.argv))
