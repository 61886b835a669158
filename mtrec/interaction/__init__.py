"""Feature interaction layers (AutoInt)."""
