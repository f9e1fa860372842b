"""A user's own `train.py` on `MeshfitCLI`: the digits classifier and data are the defaults.

    python examples/digits_cli.py fit --config examples/digits.yaml --engine.max_epochs 5
    python examples/digits_cli.py test --config examples/digits.yaml --ckpt_path best
    meshfit launch --nproc 2 --cpu-devices-per-process 4 examples/digits_cli.py fit \
        --config examples/digits.yaml --engine.strategy dp
"""

from digits_module import Classifier, DigitsData

from meshfit.cli import MeshfitCLI

if __name__ == "__main__":
    MeshfitCLI(Classifier, DigitsData)
