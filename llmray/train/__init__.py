"""Training: Muon, Ray Data pipelines, the shared step/checkpoint/metrics loop, pretraining and fine-tuning."""
