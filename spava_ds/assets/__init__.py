"""Files shipped inside the package: the tiny random-weight Qwen2.5-VL checkpoint (made by
launch/make_tiny_model.py; tests compare attention modes on it) and a small Qwen2.5-VL-shaped checkpoint trained on
the synthetic tasks of spava_ds.tasks (launch/finetune.py; docs/accuracy.md), which the main job uses when no
--model is given."""

import os
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model_dir() -> str:
    """Directory of the embedded tiny Qwen2.5-VL checkpoint (config, bf16 weights, tokenizer, video settings)."""
    path = os.path.join(_HERE, "tiny-qwen2.5-vl")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the embedded tiny model is missing from {path}: the package was installed without "
                                "its assets; regenerate them with `python launch/make_tiny_model.py`")
    return path


TRAINED_NAME = "videoqa-small"


def trained_model_dir() -> Optional[str]:
    """Directory of the embedded checkpoint trained on spava_ds.tasks, or None if the package lacks it."""
    path = os.path.join(_HERE, TRAINED_NAME)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def default_model_dir() -> str:
    """The model the CLI answers with when no --model is given: the trained checkpoint, else the tiny random one."""
    return trained_model_dir() or tiny_model_dir()
