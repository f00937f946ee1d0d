from setuptools import find_packages, setup

setup(
    name="spava_ds",
    version="0.1.0",
    description="Spava sequence-parallel approximate attention for long-video multimodal models "
                "(DeepSpeed / Megatron-core / transformers)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["spava_ds", "spava_ds.*"]),
    # the embedded checkpoints (spava_ds.assets: the tiny random one and the trained one) ship with the package
    package_data={"spava_ds.assets": ["tiny-qwen2.5-vl/*", "videoqa-small/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    # torch is not pinned here: install the build for your machine first (CPU CI: torch==2.13.0).
    install_requires=["torch>=2.5", "numpy", "transformers>=5.2", "av", "pillow"],
    entry_points={"console_scripts": ["spava-infer=spava_ds.cli:main"]},
    extras_require={
        "test": ["pytest", "pytest-timeout", "megatron-core"],
        "gpu": ["flash-attn"],
    },
)
