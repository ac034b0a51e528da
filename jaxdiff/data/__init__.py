"""Training data: MNIST (`mnist`), image–caption folders and datasets (`captions`), the latent
cache of SD fine-tuning (`latent_cache`), and resumable, per-host batches (`batches`)."""
