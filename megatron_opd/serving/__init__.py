"""The SGLang-compatible server (teacher, rollout, later judge) and the one SGLang HTTP client."""
