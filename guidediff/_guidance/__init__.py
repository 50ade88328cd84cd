"""Guidance transforms: maps from a score to a score, chained like optax transforms."""
