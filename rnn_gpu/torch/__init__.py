"""torch.nn drop-ins (see rnn_gpu.torch.layers)."""
