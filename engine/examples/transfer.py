"""Transfer learning: pretrain on digits 0-4, then reuse the body for digits 5-9.

    python -m engine.examples.transfer

1. Train a classifier for digits 0-4.
2. Build a new model with the same body and a fresh 5-class head; load the pretrained weights
   with ``strict=False`` (the head's keys are reported as missing/unexpected).
3. Freeze the body and train only the head on digits 5-9.
4. Unfreeze and fine-tune everything, the body with a 10x smaller learning rate (a second
   param group).
"""

from __future__ import annotations


import numpy as np

import engine
from engine.examples import DEVICE_HELP, argument_parser, chosen_device
from engine import nn, optim
from engine.examples.digits import prepare
from engine.train import Trainer


def body(device=None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128, device=device), nn.ReLU(), nn.Linear(128, 64, device=device), nn.ReLU())


class Classifier(nn.Module):
    def __init__(self, classes: int, device=None):
        super().__init__()
        self.body = body(device)
        self.head = nn.Linear(64, classes, device=device)

    def forward(self, x):
        return self.head(self.body(x))


def _subset(split, labels, offset):
    x, y = split
    keep = np.isin(y, labels)
    return x[keep], (y[keep] - offset).astype(np.int64)


def main(argv=None) -> dict:
    parser = argument_parser("transfer", "pretrain on digits 0-4, transfer to 5-9")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of pretraining and of each transfer run")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = parser.parse_args(argv)
    engine.manual_seed(0)
    device = chosen_device(args.device)
    verbose = 0 if args.quiet else 1
    train, val, test = prepare()
    first = [_subset(s, [0, 1, 2, 3, 4], 0) for s in (train, val, test)]
    second = [_subset(s, [5, 6, 7, 8, 9], 5) for s in (train, val, test)]

    pretrained = Classifier(5, device)
    Trainer(pretrained, optim.Adam(pretrained.parameters(), lr=2e-3), verbose=verbose).fit(
        first[0], epochs=args.epochs, val_data=first[1])

    model = Classifier(5, device)
    state = {k: v for k, v in pretrained.state_dict().items() if k.startswith("body.")}
    result = model.load_state_dict(state, strict=False)
    print(f"loaded the pretrained body; missing keys (new head): {list(result.missing_keys)}")

    model.body.requires_grad_(False)
    frozen_before = [p.numpy().copy() for p in model.body.parameters()]
    head_only = Trainer(model, optim.Adam(model.head.parameters(), lr=5e-3), verbose=verbose)
    head_only.fit(second[0], epochs=args.epochs, val_data=second[1])
    frozen_ok = all(np.array_equal(a, p.numpy()) for a, p in zip(frozen_before, model.body.parameters()))
    head_accuracy = head_only.evaluate(second[2])["accuracy"]

    model.body.requires_grad_(True)
    fine_tune = optim.Adam([{"params": model.body.parameters(), "lr": 2e-4},
                            {"params": model.head.parameters(), "lr": 2e-3}])
    tuned = Trainer(model, fine_tune, verbose=verbose)
    tuned.fit(second[0], epochs=args.epochs // 2 + 1, val_data=second[1])
    final_accuracy = tuned.evaluate(second[2])["accuracy"]
    print(f"digits 5-9 test accuracy: head only (frozen body) {head_accuracy:.4f}, "
          f"after fine-tuning {final_accuracy:.4f}; body unchanged while frozen: {frozen_ok}")
    return {"head_only_accuracy": head_accuracy, "fine_tuned_accuracy": final_accuracy, "frozen_unchanged": frozen_ok}


if __name__ == "__main__":
    main()
