"""dataloaders: compressed shards streamed into PyTorch training (see issue 5)."""
