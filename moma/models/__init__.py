"""moma.models."""
