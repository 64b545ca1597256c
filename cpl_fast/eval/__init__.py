"""Evaluation, restoration and routing analysis: metric protocols, padded/tiled inference, CLIs."""
