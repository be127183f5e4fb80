"""Post-training analyses of checkpoints (expert routing / specialization)."""
