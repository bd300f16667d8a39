"""Small helpers every stage shares: atomic file writes and one-line error messages."""
