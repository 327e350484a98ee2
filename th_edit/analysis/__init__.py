"""Analysis: the channel map, head roles, channel discovery, the grid edit search, the positional subspace."""
