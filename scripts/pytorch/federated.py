"""Plain PyTorch references of the time-to-accuracy benchmark
(participant/benches/time_to_accuracy.rs): Distributed Selective SGD and
dense federated averaging, each in one process, on a given partition.

- dssgd: the participants take turns in a fixed order. Each downloads the
  whole global model, trains one local epoch, and adds the ceil(theta_u * n)
  largest changes, clipped to [-gamma, gamma], to the global parameters.
- fedavg: in each round every participant starts from the global model,
  trains one local epoch, and the global model becomes the mean of theirs.

After every round (one epoch of every participant) the global model is
evaluated on the test set. Bytes are the payload a networked version would
move, as raw tensors: an upload of c changes is c int32 indices and c f32
values, and every dense transfer is 4 bytes a parameter. Prints one JSON
object: the settings, and per round the seconds since the start (the test
evaluations excluded), the bytes so far and the accuracy.

Run: python scripts/pytorch/federated.py --algorithm dssgd \\
         --data-dir ../shared/data/mnist --shards shards.json
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import mnist
import models


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", choices=["dssgd", "fedavg"], required=True)
    parser.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    parser.add_argument(
        "--shards", required=True, help="JSON file: a list of lists of training-set indices"
    )
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--rounds", type=int, default=60, help="local epochs of each participant")
    parser.add_argument("--target", type=float, default=0.96, help="stop at this test accuracy")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per mini-batch")
    parser.add_argument("--theta-u", type=float, default=0.1, help="upload fraction of dssgd")
    parser.add_argument("--gamma", type=float, default=0.0005, help="bound of dssgd uploads")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of libtorch")
    parser.add_argument("--seed", type=int, default=42, help="seed of the initial parameters")
    args = parser.parse_args()
    if args.rounds < 1 or args.batch_size < 1 or args.threads < 1:
        raise SystemExit("--rounds, --batch-size and --threads must be at least 1")
    if not 0 < args.theta_u <= 1:
        raise SystemExit(f"invalid --theta-u {args.theta_u}: expected a value in (0, 1]")
    if not (args.gamma > 0 and args.lr > 0):
        raise SystemExit("--gamma and --lr must be greater than 0")
    return args


def train_epoch(model, optimizer, images, labels, batch_size, generator):
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(labels), batch_size):
        batch = order[start : start + batch_size]
        loss = F.nll_loss(model(images.index_select(0, batch)), labels.index_select(0, batch))
        if not math.isfinite(loss.item()):
            raise SystemExit("training diverged; lower --lr")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def accuracy(model, images, labels):
    with torch.no_grad():
        predictions = model(images).argmax(dim=-1)
    return (predictions == labels).float().mean().item()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    (train_images, train_labels), (test_images, test_labels) = mnist.load(args.data_dir)
    with open(args.shards) as handle:
        shards = json.load(handle)
    data = [
        (train_images[torch.tensor(shard)], train_labels[torch.tensor(shard)])
        for shard in shards
    ]
    torch.manual_seed(args.seed)
    global_model = models.build(args.model)
    global_vector = torch.nn.utils.parameters_to_vector(global_model.parameters()).detach()
    n = global_vector.numel()
    c = math.ceil(args.theta_u * n)
    # The global parameters accumulate in f64, as the parameter server does.
    global_vector = global_vector.to(torch.float64)
    participants = []
    for index in range(len(shards)):
        model = models.build(args.model)
        torch.nn.utils.vector_to_parameters(global_vector.to(torch.float32), model.parameters())
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        generator = torch.Generator().manual_seed(1000 + index)
        participants.append((model, optimizer, generator))

    curve = []
    moved = 0
    training_seconds = 0.0
    for round_number in range(1, args.rounds + 1):
        started = time.perf_counter()
        if args.algorithm == "fedavg":
            total = torch.zeros(n, dtype=torch.float64)
        for (model, optimizer, generator), (images, labels) in zip(participants, data):
            torch.nn.utils.vector_to_parameters(global_vector.to(torch.float32), model.parameters())
            moved += 4 * n
            before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
            train_epoch(model, optimizer, images, labels, args.batch_size, generator)
            after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
            if args.algorithm == "dssgd":
                delta = after - before
                indices = delta.abs().topk(c, sorted=False).indices
                values = delta[indices].clamp(-args.gamma, args.gamma)
                global_vector.index_add_(0, indices, values.to(torch.float64))
                moved += 8 * c
            else:
                total += after.to(torch.float64)
                moved += 4 * n
        if args.algorithm == "fedavg":
            global_vector = total / len(participants)
        training_seconds += time.perf_counter() - started
        torch.nn.utils.vector_to_parameters(global_vector.to(torch.float32), global_model.parameters())
        reached = accuracy(global_model, test_images, test_labels)
        curve.append({"round": round_number, "seconds": training_seconds, "bytes": moved, "accuracy": reached})
        if reached >= args.target:
            break
    print(
        json.dumps(
            {
                "algorithm": args.algorithm,
                "torch": torch.__version__,
                "participants": len(shards),
                "parameters": n,
                "threads": args.threads,
                "curve": curve,
            }
        )
    )


if __name__ == "__main__":
    main()
