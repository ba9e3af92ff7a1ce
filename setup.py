"""Install grnn-fairseq: group and restricted recurrent networks as a fairseq plugin.

fairseq itself is an *extra*, not a hard requirement, on purpose: the import name
``fairseq`` is provided by several distributions (upstream ``fairseq`` built from
source, ``fairseq-fixed``, other 0.12 forks).  A hard requirement on one of them
would install a second copy over a user's existing fairseq.  So:

* fresh machine:            pip install -e ".[fairseq,test]"   (pulls fairseq-fixed)
* fairseq already present:  pip install -e ".[test]"           (uses yours)
"""
from setuptools import find_packages, setup

setup(
    name="grnn-fairseq",
    version="0.1.0",
    description="Group and restricted recurrent networks (RNNSearch, RNN LMs) for fairseq",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["grnn_fairseq", "grnn_fairseq.*"]),
    # the fused CPU LSTM is compiled from this source at first use (needs g++ and ninja)
    package_data={"grnn_fairseq.kernels": ["*.cpp", "*.h"]},
    install_requires=[
        "torch>=2.0",
        "numpy",
        "sentencepiece",
        "sacrebleu>=2.0",
        "rouge-score",
        "pyyaml",
        "ninja",   # builds the fused CPU loops (grnn_fairseq/kernels/rnn_cpu.cpp) at first use
    ],
    extras_require={
        "fairseq": ["fairseq-fixed==0.12.3.1"],
        # triton: the fused GPU kernels; CI tests them on CPU through TRITON_INTERPRET=1
        "test": ["pytest>=7", "pytest-timeout", "matplotlib",
                 "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "triton": ["triton>=3.0"],
        # scripts/report.py plots; sacremoses: Moses-tokenized BLEU as Gao et al. report it
        "report": ["matplotlib", "sacremoses"],
    },
    entry_points={
        "console_scripts": [
            "grnn-params=grnn_fairseq.params:main",
            "grnn-rouge=grnn_fairseq.scoring:main",
            "grnn-average-checkpoints=grnn_fairseq.average_checkpoints:main",
        ],
    },
)
