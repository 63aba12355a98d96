"""Policy models."""
