"""Helpers with no model knowledge: progress bars, Accelerate process gating, atomic file writes."""
