"""Training: data loading, loops and model artifacts for the two stages."""
