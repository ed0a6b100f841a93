"""MNIST or Fashion-MNIST from IDX files you already have (no download):

    python -m engine.examples.mnist --root ~/data/mnist [--epochs 5]

``--root`` holds train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz]
and t10k-labels-idx1-ubyte[.gz]. Trains a 784-256-128-10 MLP and prints the test accuracy.
"""

from __future__ import annotations


import numpy as np

import engine
from engine.examples import DEVICE_HELP, argument_parser, chosen_device
from engine import nn, optim
from engine.data import load_mnist
from engine.train import EarlyStopping, Trainer


def main(argv=None) -> dict:
    parser = argument_parser("mnist", "MLP on MNIST-format IDX files")
    parser.add_argument("--root", required=True, help="folder with the four IDX files")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="examples per optimizer step")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = parser.parse_args(argv)
    engine.manual_seed(0)
    device = chosen_device(args.device)
    x_train, y_train = load_mnist(args.root, kind="train")
    x_test, y_test = load_mnist(args.root, kind="t10k")
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    # Pixels to [0, 1], flattened; the last 10% of the training set validates.
    x_train = x_train.reshape(len(x_train), -1).astype(np.float32) / 255
    x_test = x_test.reshape(len(x_test), -1).astype(np.float32) / 255
    model = nn.Sequential(nn.Linear(784, 256, device=device), nn.ReLU(), nn.Linear(256, 128, device=device), nn.ReLU(),
                          nn.Linear(128, 10, device=device))
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-3), verbose=0 if args.quiet else 1,
                      callbacks=[EarlyStopping(patience=3)])
    trainer.fit((x_train, y_train.astype(np.int64)), epochs=args.epochs, batch_size=args.batch_size,
                validation_split=0.1)
    result = trainer.evaluate((x_test, y_test.astype(np.int64)))
    print(f"test accuracy {result['accuracy']:.4f}  test loss {result['loss']:.4f}")
    return result


if __name__ == "__main__":
    main()
