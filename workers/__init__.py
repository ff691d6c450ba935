"""Everything that touches weights: model I/O, merge methods, the merge engine,
in-memory candidates, layer stacking and export."""
