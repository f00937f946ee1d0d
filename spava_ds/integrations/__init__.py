"""Plug-ins for DeepSpeed (``deepspeed.py``), Megatron-core (``megatron.py``) and transformers."""
