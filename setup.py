"""clip-transfer: package metadata, and Beam's --setup_file for Dataflow workers."""

import setuptools

# Exact pins: the versions this project is tested with (constraints.txt pins
# the transitive closure for `make test` / `make demo`).
INSTALL_REQUIRES = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'apache-beam==2.77.0',
    'tensorflow-datasets==4.9.10',
    'tensorflow-cpu==2.21.0',
    'array-record==0.8.6',
    'scikit-learn==1.9.1',
    'transformers==5.24.0',
    'huggingface-hub==2.4.0',
    'safetensors==0.8.0',
    'sentencepiece==0.2.3',  # SigLIP's tokenizer (SiglipTokenizer reads spiece.model)
    'pillow==12.3.0',  # apache-beam needs pillow<13
    'numpy==2.4.6',
    'tqdm==4.70.1',
    'matplotlib==3.11.2',
]

setuptools.setup(
    name='clip-transfer',
    version='0.1.0',
    description='CLIP transfer learning: embed once with Beam, probe in seconds, fine-tune to compare.',
    packages=setuptools.find_packages(include=['clip_transfer*', 'pipelines*', 'probe*', 'finetune*', 'report*']),
    python_requires='>=3.11,<3.12',
    install_requires=INSTALL_REQUIRES,
    # The zero-shot prompt templates are data files inside the package.
    package_data={'clip_transfer.models.templates': ['*.json']},
    extras_require={
        # The PyTorch reference for parity tests and benchmarks. Exactly 2.13.0:
        # its CPU wheel is on the machine's disk; anything else pulls a CUDA build.
        # statsmodels: the reference the interval and McNemar tests check stats against.
        'test': ['torch==2.13.0', 'pytest==9.2.0', 'pytest-xdist==3.8.0', 'statsmodels==0.15.0'],
        # open_clip's own model, the OpenCLIP parity reference. Install it with --no-deps
        # (the Makefile does): its requirements pull torchvision, which the tests never
        # import (tests/test_open_clip.py imports open_clip.model alone).
        'open_clip_reference': ['open_clip_torch==3.3.0'],
        # Launching on Dataflow (DataflowRunner, gs:// paths): Beam's Google Cloud extra
        # (73 packages; constraints.txt pins them). `make test` installs it for the
        # offline DataflowRunner dry run in tests/test_beam_runners.py.
        'gcp': ['apache-beam[gcp]==2.77.0'],
    },
)
