"""Images in: listing class-per-folder trees, decoding (CPU and GPU), resizing, batches, feeders, augmentation."""
