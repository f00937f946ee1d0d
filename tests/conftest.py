import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # dist_utils for the test modules and the spawned workers


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None and gpus < marker.kwargs.get("count", 1):
            item.add_marker(pytest.mark.skip(reason=f"needs {marker.kwargs.get('count', 1)} CUDA GPU(s)"))
