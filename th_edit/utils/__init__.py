"""Helpers with no model knowledge: progress bars, Accelerate process gating and sharding, atomic file writes."""
