"""Stages on the one shared training loop (trainer.py): SFT and multi-teacher OPD."""
