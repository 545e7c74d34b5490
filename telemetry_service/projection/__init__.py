"""username_metrics: the fold (pure), its one writer (I1) and the drift check (I4)."""
