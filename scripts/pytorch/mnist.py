"""MNIST for the PyTorch reference scripts, loaded as the Rust participant
loads it: the four IDX files (raw or gzip) of a folder, pixels scaled to
[0, 1], then normalised with the mean and population standard deviation of
the training pixels. The test split uses the training statistics."""

import gzip
import os
import struct

import torch

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read(folder, name):
    """Returns the bytes of NAME in FOLDER, preferring the raw file."""
    raw = os.path.join(folder, name)
    if os.path.exists(raw):
        with open(raw, "rb") as handle:
            return handle.read()
    packed = raw + ".gz"
    if os.path.exists(packed):
        with gzip.open(packed, "rb") as handle:
            return handle.read()
    raise SystemExit(f"MNIST file {name} (or {name}.gz) not found in {folder}")


def _images(data):
    magic, count, rows, columns = struct.unpack(">IIII", data[:16])
    if magic != 2051 or rows != 28 or columns != 28:
        raise SystemExit("invalid IDX image file: expected magic 2051 and 28x28 images")
    pixels = torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8)
    return pixels.view(count, 1, rows, columns)


def _labels(data):
    magic, count = struct.unpack(">II", data[:8])
    if magic != 2049:
        raise SystemExit("invalid IDX label file: expected magic 2049")
    return torch.frombuffer(bytearray(data[8:]), dtype=torch.uint8).to(torch.int64)


def load(folder):
    """Returns ((train_images, train_labels), (test_images, test_labels))."""
    train_pixels = _images(_read(folder, FILES["train_images"]))
    test_pixels = _images(_read(folder, FILES["test_images"]))
    scaled = train_pixels.to(torch.float64) / 255.0
    mean = scaled.mean().item()
    std = scaled.std(unbiased=False).item() or 1.0

    def normalise(pixels):
        return ((pixels.to(torch.float32) / 255.0) - mean) / std

    train = (normalise(train_pixels), _labels(_read(folder, FILES["train_labels"])))
    test = (normalise(test_pixels), _labels(_read(folder, FILES["test_labels"])))
    return train, test
