"""Data in: Fashion-MNIST, product catalogs, prices, image decoding, loading for training."""
