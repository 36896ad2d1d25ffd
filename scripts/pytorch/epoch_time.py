"""Times local epochs of PyTorch eager training, the reference of the
participant compute benchmark (participant/benches/compute.rs).

It trains as the Rust participant does: each epoch draws a random order of
the examples, then for each mini-batch gathers the images and labels, sets
the learning rate, runs the network, takes the mean negative log-likelihood,
reads the loss and checks that it is finite, and takes an SGD step. It
prints one JSON object with the seconds of every timed epoch.

Run: python scripts/pytorch/epoch_time.py --data-dir ../shared/data/mnist \\
         --model mlp --batch-size 32 --threads 1
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import mnist
import models


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per mini-batch")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of libtorch")
    parser.add_argument("--examples", type=int, default=600, help="training examples per epoch")
    parser.add_argument("--epochs", type=int, default=20, help="timed epochs, after one warm-up")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate")
    args = parser.parse_args()
    if args.batch_size < 1 or args.threads < 1 or args.examples < 1 or args.epochs < 1:
        raise SystemExit("--batch-size, --threads, --examples and --epochs must be at least 1")

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(42)
    (images, labels), _ = mnist.load(args.data_dir)
    images = images[: args.examples].contiguous()
    labels = labels[: args.examples].contiguous()
    model = models.build(args.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(1)

    def epoch():
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), args.batch_size):
            batch = order[start : start + args.batch_size]
            inputs = images.index_select(0, batch)
            targets = labels.index_select(0, batch)
            for group in optimizer.param_groups:
                group["lr"] = args.lr
            loss = F.nll_loss(model(inputs), targets)
            value = loss.item()
            if not math.isfinite(value):
                raise SystemExit(f"training diverged: loss {value}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    epoch()
    seconds = []
    for _ in range(args.epochs):
        started = time.perf_counter()
        epoch()
        seconds.append(time.perf_counter() - started)
    print(json.dumps({"torch": torch.__version__, "seconds": seconds}))


if __name__ == "__main__":
    main()
