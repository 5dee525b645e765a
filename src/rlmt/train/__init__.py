"""Training loops: the offline loop (SFT) and the online loop (rejection sampling, later policy gradient)."""
