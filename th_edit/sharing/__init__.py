"""Sharing: card templates and cards, plans and checkpoints on disk, the Hub, task datasets, bundled models."""
