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


def flat_parameters(model):
    """The parameters as one vector, in the Rust participant's order: the
    variables sorted by name (fc1.bias before fc1.weight), each flattened in
    row-major order. PyTorch names Sequential layers by position, so the
    names are mapped to the Rust ones first."""
    return [tensor for _, tensor in sorted(named_parameters(model))]


def named_parameters(model):
    """(Rust name, tensor) of every parameter of MODEL."""
    layers = [module for module in model if isinstance(module, (nn.Linear, nn.Conv2d))]
    names = []
    convolutions = 0
    linears = 0
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            convolutions += 1
            prefix = f"conv{convolutions}"
        else:
            linears += 1
            prefix = f"fc{linears}"
        names.append((f"{prefix}.bias", layer.bias))
        names.append((f"{prefix}.weight", layer.weight))
    return names
