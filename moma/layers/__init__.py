"""moma.layers."""
