"""kai-train: train multimodal foundation models from freshly initialized weights, with provenance."""
