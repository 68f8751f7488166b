"""The end-to-end Keras model of any run: preprocessing, frozen bases, pooling, heads."""
