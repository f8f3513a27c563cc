"""Install PixArt-delta research code: `pip install -e .[test]`."""

from setuptools import find_packages, setup

setup(
    name="pixart-delta",
    version="0.1.0",
    description="PixArt-delta: latent consistency distillation, ControlNet-Transformer and low-memory "
    "inference on the PixArt-alpha diffusion transformer",
    python_requires=">=3.10",
    # train/ and sample/ hold entry scripts (train/train.py, sample/sample.py), not packages: a package named
    # like a script in its own folder would be shadowed by that script when it runs.
    packages=find_packages(include=["common*", "models*", "diffusion*", "data*", "engine*", "configs*", "evaluation*",
                                    "pipeline*", "tasks*", "tools*"]),
    package_data={"configs": ["*.yaml", "**/*.yaml"]},
    install_requires=[
        # These two pins take the wheels on this project's machines' disk; others download gigabytes.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "einops>=0.8",
        "transformers>=4.46",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tensorboard>=2.16",
        "safetensors>=0.4",
        "diffusers>=0.32",
        "tqdm>=4.66",
        "pillow>=10.0",
        "scipy>=1.11",
        "peft>=0.13",          # LoRA adapters for consistency distillation (LCM-LoRA)
        "torchao==0.18.0",     # int8/fp8 inference (models/quantize.py); its releases follow torch releases
    ],
    extras_require={
        "demo": ["gradio>=5.0"],
        # The test extra installs the demo too, so its HTTP and browser tests run (selenium drives the chromium that
        # .ci/run installs); pytorch-fid and torchmetrics are oracles.
        "test": ["pytest>=8.0", "pytorch-fid>=0.3", "torchmetrics>=1.4", "gradio>=5.0", "gradio_client>=1.0",
                 "selenium>=4.10"],
    },
)
