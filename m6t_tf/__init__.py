"""m6t_tf: M6-T sparse Mixture-of-Experts Transformers in TensorFlow / Keras 3 with Horovod."""
__version__ = "0.1.0"
