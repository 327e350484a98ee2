"""Edits: the Edit/EditPlan records, exact rank-k rescaling with an undo log, run-time steering."""
