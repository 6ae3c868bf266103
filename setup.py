"""m6t_tf: M6-T sparse Mixture-of-Experts Transformers in TensorFlow/Keras 3 with Horovod."""
import setuptools

setuptools.setup(
    name="m6t_tf",
    version="0.1.0",
    description="M6-T sparse MoE Transformer (expert prototyping) in TensorFlow/Keras 3 + Horovod",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["m6t_tf", "m6t_tf.*"]),
    install_requires=[
        "tensorflow==2.21.0",
        "tensorflow-text==2.21.1",
        "gin-config==0.5.0",
        "absl-py>=2.1",
        "numpy>=1.26,<3",
        # horovod==0.28.1 is built from source by tools/setup_env.sh (see docs/setup.md "Stack, and why").
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
        "plots": ["matplotlib>=3.8"],
    },
)
