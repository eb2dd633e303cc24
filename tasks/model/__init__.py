"""The model: training settings, Keras graphs and kernels, base weights, frozen features, checkpoints, training, export."""
