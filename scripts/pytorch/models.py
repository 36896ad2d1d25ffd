"""The participant's MNIST networks in PyTorch, layer for layer."""

from torch import nn


def build(kind):
    """Returns the network KIND ("mlp" or "cnn"), ending in log-softmax."""
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
            nn.LogSoftmax(dim=-1),
        )
    if kind == "cnn":
        # 28x28 -> conv 24x24 -> pool 8x8 -> conv 4x4 -> pool 2x2: 256 features.
        return nn.Sequential(
            nn.Conv2d(1, 32, 5),
            nn.Tanh(),
            nn.MaxPool2d(3, 3),
            nn.Conv2d(32, 64, 5),
            nn.Tanh(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(256, 200),
            nn.Tanh(),
            nn.Linear(200, 10),
            nn.LogSoftmax(dim=-1),
        )
    raise SystemExit(f"invalid model {kind!r}: expected mlp or cnn")

