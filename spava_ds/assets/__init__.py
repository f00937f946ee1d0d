"""Files shipped inside the package: the tiny random-weight Qwen2.5-VL checkpoint (made by
launch/make_tiny_model.py) that the engine uses when no --model is given."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model_dir() -> str:
    """Directory of the embedded tiny Qwen2.5-VL checkpoint (config, bf16 weights, tokenizer, video settings)."""
    path = os.path.join(_HERE, "tiny-qwen2.5-vl")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the embedded tiny model is missing from {path}: the package was installed without "
                                "its assets; regenerate them with `python launch/make_tiny_model.py`")
    return path
