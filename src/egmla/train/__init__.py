"""Training: the LightningModule, the streaming DataModule, checkpoints, throughput, the egmla-train entry point."""
