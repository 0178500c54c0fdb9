"""The hidden oracle of the rubric task (issue 14): what each rubric code means and weighs.

Only the annotation maker (grm_oracle/annotate.py) and the evaluator import this package; no
training code does (tests/test_grm.py checks every module's imports, and runs the trainer's side
with this package unreachable). The trainer sees the codes, never their meaning: its only
supervision is the annotation file.
"""
