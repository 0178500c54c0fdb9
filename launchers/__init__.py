"""Launchers: every role of a job on one machine (local.py) or a SLURM cluster (slurm.py)."""
