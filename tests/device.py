"""The device the trainer tests train on: CPU unless ``TETHER_TEST_DEVICE`` names another.

CI runs the suite on CPU. On a machine with a GPU, ``TETHER_TEST_DEVICE=cuda pytest
tests/test_ppo_trainer.py ...`` runs the same trainer tests on CUDA.
"""

import os

DEVICE = os.environ.get("TETHER_TEST_DEVICE", "cpu")
