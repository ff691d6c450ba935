"""What is searched: the recipe contract, search spaces and the optimizers that
propose points. Pure Python (no torch, no Ray)."""
