"""Rollout engines: where a stage's trajectories come from (in-job or SGLang) and weight sync."""
