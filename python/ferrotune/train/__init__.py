"""Training: pure losses (`losses.py`), the shared loop (`loop.py`), and the entry points for
continued pretraining and SFT (`sft.py`, `pretrain.py`) behind `ferrotune train`."""
