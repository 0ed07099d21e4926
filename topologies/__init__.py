"""Agent graphs and collaboration patterns (debate, cascade, ensemble, mixture-of-agents)."""
